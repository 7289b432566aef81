"""The torch internals meshplan relies on, read from torch 2.13.0.

- Which rows, columns, ... of the whole tensor a DTensor's local shard holds, to read just that
  part of a checkpoint: under TP, FSDP2 and TP x FSDP2, whose 2-D parameters may be placed with
  torch's private ``_StridedShard`` (sharded along the tensor-parallel dimension first, then along
  the data-parallel one). torch has no public function for it; ``compute_local_shape_and_global_offset``
  gives only the first offset, which hides a shard that is not one block.
- The planner runs a model's forward pass on fake tensors (shapes and dtypes, no memory) to
  count the activations it saves: torch's FakeTensorMode, and a storage's identity, which
  fake tensors share between views as real ones do but with no address to compare.
- The planner's measurements (planner/measure.py) read the collectives a step issues from the
  schemas of c10d's and the functional collectives' ops, resolve their process groups, and count
  live memory by weak references to storages, whose Python objects torch keeps one per storage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._python_dispatch import TorchDispatchMode

from meshplan._compat import Internal, require_attributes, require_parameters

READ_FROM = "2.13.0"


def local_indices(tensor: DTensor) -> list[torch.Tensor] | None:
    """For each dimension of ``tensor``, the indices in the whole tensor of what this rank's shard holds,
    in the order the shard holds them (CPU int64). None for a placement other than Replicate, Shard and
    torch 2.13.0's ``_StridedShard`` (a Partial one holds no part of the whole tensor). Local, no collective.

    Each dimension's indices are what torch itself gives this rank when it distributes the numbers
    0..n-1 with the placements that shard that dimension (``distribute_tensor`` with
    ``src_data_rank=None``, which cuts locally): the same rule FSDP2 and TP shard by, uneven sizes,
    padding and the order of ``_StridedShard`` included.
    """
    indices = []
    for dimension, size in enumerate(tensor.shape):
        placements = [_along(placement, dimension) for placement in tensor.placements]
        if any(placement is None for placement in placements):
            return None
        numbers = torch.arange(size, device=tensor.device_mesh.device_type)
        local = distribute_tensor(numbers, tensor.device_mesh, placements, src_data_rank=None).to_local()
        indices.append(local.cpu())
    return indices


def _along(placement: Any, dimension: int) -> Any:
    """The placement of one dimension's index vector (dimension 0) under ``placement``: sharded as that
    dimension is, else whole (Replicate). None for a placement that holds no part of the whole tensor."""
    if isinstance(placement, _StridedShard):
        return _StridedShard(0, split_factor=placement.split_factor) if placement.dim == dimension else Replicate()
    if isinstance(placement, Shard):
        return Shard(0) if placement.dim == dimension else Replicate()
    if isinstance(placement, Replicate):
        return Replicate()
    return None


def _check_local_indices() -> None:
    # The indices need a live device mesh, which a canary cannot build without a process group: the
    # class and the functions are checked here, the indices by every TP and FSDP2 checkpoint test.
    require_parameters(distribute_tensor, "tensor", "device_mesh", "placements", "src_data_rank")
    require_attributes(_StridedShard, "dim", "split_factor")
    strided = _StridedShard(1, split_factor=2)
    assert (strided.dim, strided.split_factor) == (1, 2), "_StridedShard(dim, split_factor=) no longer keeps them"
    assert not isinstance(strided, Shard), "_StridedShard is now a Shard: _along would take it for a plain one"


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


# ---------------------------------------------------------------- collectives, as a dispatch mode sees them


# The op namespaces whose ops are collectives (torch 2.13.0): c10d's, which every ProcessGroup call
# dispatches (torch.distributed's functions, DDP's reducer, DeepSpeed's communication); the
# functional collectives (DTensor's) and their autograd forms; the legacy functional ones.
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd", "c10d_functional")

# Ops of those namespaces that move no data of their own.
_NOT_COLLECTIVES = frozenset({"wait_tensor", "_wrap_tensor_autograd", "check_for_nan"})

# Each collective op, by its name in its namespace: (kind, the argument whose tensors make the
# payload, the argument naming the root, the argument with the input splits); read from the
# schemas of torch 2.13.0.
_C10D_OPS: dict[str, tuple[str, str | None, str | None, str | None]] = {
    "allreduce_": ("all_reduce", "tensors", None, None),
    "allreduce_coalesced_": ("all_reduce", "tensors", None, None),
    "_allgather_base_": ("all_gather", "output_tensor", None, None),
    "allgather_": ("all_gather", "output_tensors", None, None),
    "allgather_coalesced_": ("all_gather", "output_lists", None, None),
    "allgather_into_tensor_coalesced_": ("all_gather", "outputs", None, None),
    "reduce_scatter_": ("reduce_scatter", "input_tensors", None, None),
    "_reduce_scatter_base_": ("reduce_scatter", "input_tensor", None, None),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", "inputs", None, None),
    "reduce_": ("reduce", "tensors", "root_rank", None),
    "broadcast_": ("broadcast", "tensors", "root_rank", None),
    "alltoall_base_": ("all_to_all", "input", None, "input_split_sizes"),
    "alltoall_": ("all_to_all", "input_tensors", None, None),
    "gather_": ("gather", "input_tensors", "root_rank", None),
    "scatter_": ("scatter", "input_tensors", "root_rank", None),
    "send": ("send", "tensors", None, None),
    "recv_": ("recv", None, None, None),
    "recv_any_source_": ("recv", None, None, None),
    "barrier": ("barrier", None, None, None),
    "monitored_barrier_": ("barrier", None, None, None),
}
# The functional collectives; their autograd forms (_c10d_functional_autograd) bear the same names.
# Their all-gathers take the input: the payload is that times the group size (the whole output).
_FUNCTIONAL_OPS: dict[str, tuple[str, str | None, str | None, str | None]] = {
    "all_reduce": ("all_reduce", "input", None, None),
    "all_reduce_": ("all_reduce", "input", None, None),
    "all_reduce_coalesced": ("all_reduce", "inputs", None, None),
    "all_reduce_coalesced_": ("all_reduce", "inputs", None, None),
    "all_gather_into_tensor": ("all_gather", "input", None, None),
    "all_gather_into_tensor_out": ("all_gather", "input", None, None),
    "all_gather_into_tensor_coalesced": ("all_gather", "inputs", None, None),
    "reduce_scatter_tensor": ("reduce_scatter", "input", None, None),
    "reduce_scatter_tensor_out": ("reduce_scatter", "input", None, None),
    "reduce_scatter_tensor_coalesced": ("reduce_scatter", "inputs", None, None),
    "all_to_all_single": ("all_to_all", "input", None, "input_split_sizes"),
    "broadcast": ("broadcast", "input", "src", None),
    "broadcast_": ("broadcast", "input", "src", None),
    "isend": ("send", "tensor", None, None),
    "irecv": ("recv", None, None, None),
    "batch_p2p_ops": ("send", "tensors", None, None),  # the tensors whose op_list entry sends
}


@dataclass(frozen=True)
class CollectiveCall:
    """One collective op this rank issued, read from the op's arguments.

    Attributes:
        op: the op's qualified name (``"c10d::allreduce_"``).
        kind: all_reduce, all_gather, reduce_scatter, reduce, broadcast, all_to_all, gather, scatter,
            send, recv or barrier; ``"unknown"`` for an op of a collective namespace not read here.
        payload: bytes of the tensors that make the collective's size: the whole output of an
            all-gather; the whole input of a reduce-scatter, all-to-all, gather or scatter; the
            tensors of the others (the sent ones of a batch of point-to-point ops).
        group_size: processes in the op's group.
        group_rank: this process's rank in that group.
        root: the group rank of the root of a reduce, broadcast, gather or scatter; else None.
        kept: bytes of an all-to-all's or scatter's payload that stay on this rank, where the
            arguments say; else None.
    """

    op: str
    kind: str
    payload: int
    group_size: int
    group_rank: int
    root: int | None = None
    kept: int | None = None


def read_collective(func: Any, args: tuple, kwargs: dict | None) -> CollectiveCall | None:
    """The collective that an op call handed to a ``TorchDispatchMode`` issues, or None for an op that
    moves no data between processes. ``func`` is the mode's OpOverload (its ``namespace`` and
    ``_schema``, torch 2.13.0); arguments are read by their names in the schema."""
    if func.namespace not in COLLECTIVE_NAMESPACES:
        return None
    name = func._schema.name.split("::")[-1]
    if name in _NOT_COLLECTIVES:
        return None
    qualified = f"{func.namespace}::{name}"
    table = _C10D_OPS if func.namespace == "c10d" else _FUNCTIONAL_OPS if func.namespace.startswith("_") else {}
    arguments = _arguments_by_name(func, args, kwargs)
    if name not in table:  # a new op, or a legacy functional one (ranks and tag, no group)
        return CollectiveCall(qualified, "unknown", 0, 0, 0)
    group_size, group_rank = _group_of(arguments)
    kind, payload_argument, root_argument, splits_argument = table[name]
    tensors = _tensors(arguments.get(payload_argument)) if payload_argument else []
    if name == "batch_p2p_ops":
        tensors = [tensor for operation, tensor in zip(arguments["op_list"], tensors) if "send" in operation]
    payload = sum(_nbytes(tensor) for tensor in tensors)
    if table is _FUNCTIONAL_OPS and kind == "all_gather":
        payload *= group_size
    root = int(arguments[root_argument]) if root_argument else None
    return CollectiveCall(qualified, kind, payload, group_size, group_rank, root,
                          _kept_bytes(name, arguments, tensors, payload, splits_argument, group_rank))


def _arguments_by_name(func: Any, args: tuple, kwargs: dict | None) -> dict[str, Any]:
    arguments = {argument.name: value for argument, value in zip(func._schema.arguments, args)}
    arguments.update(kwargs or {})
    return arguments


def _group_of(arguments: dict[str, Any]) -> tuple[int, int]:
    """(size, this process's rank) of the group an op runs in: a ProcessGroup, which c10d's ops receive
    boxed as a TorchScript object, or a group's name (the functional ops; ``_resolve_process_group``)."""
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = arguments["process_group"] if "process_group" in arguments else arguments["group_name"]
    if isinstance(group, torch.ScriptObject):
        group = dist.ProcessGroup.unbox(group)
    elif isinstance(group, str):
        group = _resolve_process_group(group)
    return group.size(), group.rank()


def _kept_bytes(name: str, arguments: dict[str, Any], tensors: list[torch.Tensor], payload: int,
                splits_argument: str | None, group_rank: int) -> int | None:
    """Bytes of an all-to-all's or scatter's payload that stay on this rank, where the arguments say."""
    if name == "alltoall_":  # one input tensor per rank
        return _nbytes(tensors[group_rank]) if len(tensors) > group_rank else None
    if name == "scatter_":  # [[one chunk per rank]], on the root only
        chunks = arguments["input_tensors"][0] if arguments["input_tensors"] else []
        return _nbytes(chunks[group_rank]) if len(chunks) > group_rank else None
    splits = [int(split) for split in arguments.get(splits_argument) or []] if splits_argument else []
    if not splits or not tensors or not sum(splits):
        return None  # even splits: the caller's convention applies
    return payload * splits[group_rank] // sum(splits)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in an argument: a tensor, or lists of them (nested, as c10d's all-gather outputs)."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [tensor for item in value for tensor in _tensors(item)]
    return []


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _check_collective_schemas() -> None:
    import torch.distributed as dist
    import torch.distributed._functional_collectives  # noqa: F401 - registers the autograd forms
    from torch.distributed.distributed_c10d import _resolve_process_group

    assert callable(_resolve_process_group), "_resolve_process_group is no longer a function"
    assert callable(getattr(dist.ProcessGroup, "unbox", None)), "ProcessGroup.unbox is gone"
    for namespace, table, group in (("c10d", _C10D_OPS, "process_group"), ("_c10d_functional", _FUNCTIONAL_OPS, "group_name")):
        for name, (_, payload, root, splits) in table.items():
            op = getattr(getattr(torch.ops, namespace), name).default
            names = {argument.name for argument in op._schema.arguments}
            wanted = {group, *(argument for argument in (payload, root, splits) if argument)}
            assert wanted <= names, f"{namespace}::{name} no longer takes {', '.join(sorted(wanted - names))}"
    for name in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_to_all_single"):
        autograd = {argument.name for argument in getattr(torch.ops._c10d_functional_autograd, name).default._schema.arguments}
        assert {"input", "group_name"} <= autograd, f"_c10d_functional_autograd::{name} changed its arguments"


def _check_storage_lifetime() -> None:
    # MemoryTracker (planner/measure.py) keeps a weak reference to each storage it counts and
    # subtracts it when the reference dies: torch keeps a storage's Python object alive, and the
    # same, as long as any tensor uses the storage.
    import gc
    import weakref

    tensor = torch.zeros(16)
    storage = tensor.untyped_storage()
    identity, died = id(storage), []
    reference = weakref.ref(storage, lambda _: died.append(True))
    del storage
    gc.collect()
    assert not died and id(tensor.untyped_storage()) == identity, "a storage's Python object no longer lives as long as its tensors"
    del tensor
    gc.collect()
    assert died and reference() is None, "a storage's Python object outlives its last tensor"


INTERNALS: list[Internal] = [
    Internal(
        "torch", "torch.distributed.tensor.placement_types._StridedShard (dim, split_factor), distribute_tensor(src_data_rank=None)",
        "the part of a whole checkpoint tensor that a TP, FSDP2 or TP x FSDP2 shard holds (checkpoint/engines.py)",
        READ_FROM, _check_local_indices,
    ),
    Internal(
        "torch", "torch._subclasses.fake_tensor.FakeTensorMode, UntypedStorage._cdata, torch.utils._python_dispatch.TorchDispatchMode",
        "a forward pass on fake tensors, and their storages told apart, to count saved activations (planner/activations.py)",
        READ_FROM, _check_fake_tensor_mode,
    ),
    Internal(
        "torch", "c10d and _c10d_functional op schemas, torch.distributed.distributed_c10d._resolve_process_group, ProcessGroup.unbox",
        "read the collectives a step issues, their tensors and group, to count the bytes sent (planner/measure.py)",
        READ_FROM, _check_collective_schemas,
    ),
    Internal(
        "torch", "UntypedStorage Python object lifetime (one per storage, alive while any tensor uses it)",
        "count live tensor memory by weak references to storages (planner/measure.py MemoryTracker)",
        READ_FROM, _check_storage_lifetime,
    ),
]
