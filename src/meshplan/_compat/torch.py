"""The torch internals meshplan relies on, read from torch 2.13.0.

- Where a DTensor's local shard sits in the whole tensor, to read just that slice of a
  checkpoint. torch has no public function for it; ``DTensor.__create_chunk_list__`` (the
  distributed checkpoint's protocol) gives the same answer through more private machinery.
- The planner runs a model's forward pass on fake tensors (shapes and dtypes, no memory) to
  count the activations it saves: torch's FakeTensorMode, and a storage's identity, which
  fake tensors share between views as real ones do but with no address to compare.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.utils._python_dispatch import TorchDispatchMode

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


def fake_tensor_mode() -> FakeTensorMode:
    """A mode in which new tensors and modules are fake: real shapes, dtypes and devices, no memory
    (torch 2.13.0's ``torch._subclasses.fake_tensor.FakeTensorMode``). Unlike the meta device, a
    fake CPU tensor dispatches to the CPU's kernel choices (flash attention in SDPA), so what a
    forward pass saves for backward is what a real one saves. Real tensors may enter it."""
    return FakeTensorMode(allow_non_fake_inputs=True)


def storage_key(tensor: torch.Tensor) -> int:
    """An integer that identifies the storage under ``tensor``: equal for views of one storage,
    fake tensors included (``UntypedStorage._cdata``, the address of torch 2.13.0's StorageImpl)."""
    return tensor.untyped_storage()._cdata


class CopiesOf(TorchDispatchMode):
    """Inside it, ``keys`` collects the storage keys of every copy made of a tensor whose storage key
    is in ``sources`` (torch 2.13.0's ``torch.utils._python_dispatch.TorchDispatchMode``, seeing
    ``aten._to_copy``): autocast's low-precision copies of the weights, which it keeps for backward."""

    def __init__(self, sources: set[int]) -> None:
        super().__init__()
        self.sources = sources
        self.keys: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        result = func(*args, **(kwargs or {}))
        source = args[0] if args else None
        if func is torch.ops.aten._to_copy.default and isinstance(source, torch.Tensor) and storage_key(source) in self.sources:
            self.keys.add(storage_key(result))
        return result


def _check_fake_tensor_mode() -> None:
    with fake_tensor_mode():
        whole = torch.empty(4, 8)
        view = whole.t()
        other = torch.empty(4, 8)
    assert whole.untyped_storage().nbytes() == 128, "a fake tensor no longer reports its storage's size"
    assert storage_key(whole) == storage_key(view), "a view of a fake tensor no longer shares its storage key"
    assert storage_key(whole) != storage_key(other), "two fake tensors share one storage key"
    with fake_tensor_mode():
        weight = torch.empty(8, 8)
        with CopiesOf({storage_key(weight)}) as copies:
            half = weight.to(torch.bfloat16)
    assert copies.keys == {storage_key(half)}, "a dispatch mode no longer sees the copy of a tensor"


INTERNALS: list[Internal] = [
    Internal(
        "torch", "torch.distributed.tensor._utils.compute_local_shape_and_global_offset",
        "the slice of a whole checkpoint tensor that a DTensor shard holds (checkpoint/engines.py)",
        READ_FROM, _check_local_shape_and_offset,
    ),
    Internal(
        "torch", "torch._subclasses.fake_tensor.FakeTensorMode, UntypedStorage._cdata, torch.utils._python_dispatch.TorchDispatchMode",
        "a forward pass on fake tensors, and their storages told apart, to count saved activations (planner/activations.py)",
        READ_FROM, _check_fake_tensor_mode,
    ),
]
