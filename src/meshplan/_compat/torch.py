"""The torch internals meshplan relies on, read from torch 2.13.0.

Only one: where a DTensor's local shard sits in the whole tensor, to read just that slice of a
checkpoint. torch has no public function for it; ``DTensor.__create_chunk_list__`` (the
distributed checkpoint's protocol) gives the same answer through more private machinery.
"""

from __future__ import annotations

from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from meshplan._compat import Internal, require_parameters

READ_FROM = "2.13.0"


def local_shape_and_offset(tensor: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shape of this rank's shard of ``tensor`` and its offset in the whole tensor (torch 2.13.0's
    ``torch.distributed.tensor._utils.compute_local_shape_and_global_offset``). Local, no collective."""
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tuple(shape), tuple(offset)


def _check_local_shape_and_offset() -> None:
    # Its result needs a live device mesh, which a canary cannot build without a process group: the
    # signature is checked here, the result by every TP checkpoint test.
    require_parameters(compute_local_shape_and_global_offset, "global_shape", "mesh", "placements")


INTERNALS: list[Internal] = [
    Internal(
        "torch", "torch.distributed.tensor._utils.compute_local_shape_and_global_offset",
        "the slice of a whole checkpoint tensor that a DTensor shard holds (checkpoint/engines.py)",
        READ_FROM, _check_local_shape_and_offset,
    ),
]
