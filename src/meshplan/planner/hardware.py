"""The hardware the planner plans for: memory sizes as people write them, and link speeds."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from meshplan.errors import PlanError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class Links:
    """Bandwidths in bytes per second that rank candidate layouts by their communication time.

    Defaults: NVLink inside an H100/H200 node (ring all-reduce bus bandwidth about 360 GB/s of its
    450 GB/s line rate, per nccl-tests), one InfiniBand NDR 400 Gb/s link per GPU between nodes
    (about 45 GB/s of 50), and PCIe Gen5 x16 for offload traffic (25 GB/s, well under its 63 GB/s
    line rate, because the GPUs of a node share the host's memory bandwidth).
    """

    intra_node: float = 360e9
    inter_node: float = 45e9
    host: float = 25e9


def parse_memory(value: int | float | str) -> int:
    """Bytes in ``value``: an integer, or a size such as ``"80GB"``, ``"80 GiB"`` or ``"512MB"``.

    GB is 10^9 bytes, as GPU makers count; GiB is 2^30.
    """
    if isinstance(value, bool):
        raise PlanError(f"device memory {value!r} is not a size; write it as 80GB, 80GiB or a number of bytes.")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(value))
        if match is None or match.group(2).upper() not in _UNITS:
            raise PlanError(f"device memory {str(value)!r} is not a size; write it as 80GB, 80GiB, 512MB or a number of bytes.")
        number, unit = float(match.group(1)), match.group(2).upper()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise PlanError(f"device memory {value!r} must be more than 0 bytes.")
    return size


def memory_per_process(processes_per_node: int, device: object = None) -> int:
    """Bytes one process may use: a CUDA device's total memory, or on CPU the host's memory shared
    evenly by the ``processes_per_node`` processes of this machine."""
    import torch

    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda" or device is None and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device or torch.cuda.current_device()).total_memory)
    return host_memory() // max(1, processes_per_node)


def host_memory() -> int:
    """Bytes of memory this machine has (the smaller of its RAM and a cgroup's limit, when one is set)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(limit_file).read().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def format_bytes(size: float) -> str:
    """``size`` bytes for people: 1.5 GB, 312 MB (powers of ten, as device memory is sold)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(size) >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{int(size)} B"
