"""What a training step really holds and sends, measured on the running rank: the figures that
``meshplan.estimate`` is checked against (tests/scripts/planner_measure.py).

- ``model_state_bytes``: the parameters, gradients and optimizer states this rank holds now,
  through DDP, DTensor shards and DeepSpeed ZeRO's partitions and offload, each storage once;
  ``gradient_bytes`` the gradients alone (call it between backward and the optimizer step to
  see them at their peak: DeepSpeed frees its low-precision gradients in the step).
- ``MemoryTracker`` and ``peak_step_memory``: the bytes of live tensors before a step and at
  its peak, counted by torch's dispatcher as storages are made and freed, not by process RSS.
- ``count_communication``: the collectives this rank issues inside a block, whoever issues them
  (torch.distributed, DDP's C++ reducer, DeepSpeed, DTensor), and the bytes it sends.

Every figure is this rank's own; on a CPU-only machine "device" memory is host memory, and the
bytes DeepSpeed's offload keeps on the CPU are told apart by where DeepSpeed keeps them.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from meshplan._compat.deepspeed import (
    is_zero3_parameter, is_zero_optimizer, zero3_partition, zero_flat_partitions, zero_flat_state,
    zero_gradient_tensors, zero_offloaded_tensors,
)
from meshplan._compat.torch import CollectiveCall, TorchDispatchMode, read_collective

# ---------------------------------------------------------------- storages


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """The part of ``tensor`` this rank stores: a DTensor's local shard, any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The storage under ``tensor``'s local part, or None when it holds no memory (meta, fake or empty)."""
    try:
        storage = _local(tensor).untyped_storage()
        if storage.device.type == "meta" or storage.nbytes() == 0 or storage.data_ptr() == 0:
            return None
    except (RuntimeError, NotImplementedError, TypeError):  # a tensor subclass without storage of its own
        return None
    return storage


class _Ledger:
    """Sums storage bytes, each storage once however many tensors view it (keyed by its address)."""

    def __init__(self) -> None:
        self.seen: set[tuple[str, int]] = set()

    def add(self, tensors: Iterable[torch.Tensor | None]) -> int:
        """Bytes of the storages of ``tensors`` not counted before."""
        return sum(self.add_storages(tensors).values())

    def add_storages(self, tensors: Iterable[torch.Tensor | None]) -> dict[tuple[str, int], int]:
        """The storages of ``tensors`` not counted before, with their bytes, by key."""
        new: dict[tuple[str, int], int] = {}
        for tensor in tensors:
            storage = _storage(tensor) if isinstance(tensor, torch.Tensor) else None
            if storage is None:
                continue
            key = (str(storage.device), storage.data_ptr())
            if key not in self.seen:
                self.seen.add(key)
                new[key] = storage.nbytes()
        return new


def live_tensors() -> Iterator[torch.Tensor]:
    """Every tensor a Python object reaches (a walk of the garbage collector's objects), and the
    gradient of every leaf among them. Tensors only C++ holds (DDP's buckets, tensors saved for
    backward that Python never saw) are not among them."""
    for obj in gc.get_objects():
        # type(), not isinstance: isinstance reads __class__, which some objects answer with a warning.
        if not issubclass(type(obj), torch.Tensor):
            continue
        yield obj
        if obj.is_leaf and obj.requires_grad and obj.grad is not None:
            yield obj.grad


def live_tensor_bytes() -> int:
    """Bytes of the storages of ``live_tensors()``, each once."""
    return _Ledger().add(live_tensors())


# ---------------------------------------------------------------- model states


def _inner_optimizer(model: nn.Module, optimizer: Any) -> Any:
    """The optimizer that holds the states: through the public ``optimizer`` of Accelerate's,
    Lightning's and DeepSpeed's wrappers (and of a DeepSpeedEngine given as the model) down to a
    ZeRO optimizer or a torch one."""
    if optimizer is None:
        optimizer = getattr(model, "optimizer", None)
    seen: set[int] = set()
    while optimizer is not None and not is_zero_optimizer(optimizer) and id(optimizer) not in seen:
        seen.add(id(optimizer))
        inner = getattr(optimizer, "optimizer", None)
        if inner is None:
            break
        optimizer = inner
    return optimizer


def _parameter_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """The tensors that hold the parameters: each parameter's data (a DTensor's local shard; a ZeRO-3
    parameter's data while it is gathered or persistent, empty otherwise) and ZeRO-3's partitions."""
    for parameter in model.parameters():
        if is_zero3_parameter(parameter):
            yield zero3_partition(parameter)
        yield parameter


def _gradient_tensors(model: nn.Module, optimizer: Any) -> Iterator[torch.Tensor]:
    """The parameters' gradients, and the gradient partitions and buffers a ZeRO optimizer holds."""
    for parameter in model.parameters():
        if parameter.grad is not None:
            yield parameter.grad
    if is_zero_optimizer(optimizer):
        yield from zero_gradient_tensors(optimizer)


def _state_values(state: dict[Any, dict[str, Any]]) -> Iterator[torch.Tensor]:
    for values in state.values():
        yield from (value for value in values.values() if isinstance(value, torch.Tensor))


def _optimizer_state_tensors(optimizer: Any) -> Iterator[torch.Tensor]:
    """The optimizer's states (Adam's moments, its step counts) and ZeRO's fp32 master partitions."""
    if optimizer is None:
        return
    if is_zero_optimizer(optimizer):
        yield from zero_flat_partitions(optimizer)
        yield from _state_values(zero_flat_state(optimizer))
    else:
        yield from _state_values(optimizer.state)


def model_state_bytes(model: nn.Module, optimizer: Any = None) -> dict[str, int]:
    """The bytes this rank holds now, by kind, each storage counted once.

    Args:
        model: the model as prepared (DDP, a DeepSpeedEngine, a TP-sharded module, a plain one).
        optimizer: its optimizer as prepared (Accelerate's, Lightning's or DeepSpeed's wrapper, a
            ZeRO optimizer or a torch one); by default the model's own (a DeepSpeedEngine's).

    Returns:
        ``parameters``, ``gradients``, ``optimizer_states`` (with ZeRO's fp32 masters), wherever they
        are; ``offloaded_parameters``, ``offloaded_gradients``, ``offloaded_optimizer_states``: the
        part of each that DeepSpeed's offload keeps on the CPU, and ``offloaded`` their sum;
        ``other``: every other live tensor (communication buckets, batches, caches; see
        ``live_tensors``). A storage shared by two kinds counts in the first, in that order. Call it
        after ``optimizer.step()`` and before ``zero_grad`` for the states a step leaves; see
        ``gradient_bytes`` for the gradients at their peak.
    """
    optimizer = _inner_optimizer(model, optimizer)
    ledger = _Ledger()
    kinds = {
        "parameters": ledger.add_storages(_parameter_tensors(model)),
        "gradients": ledger.add_storages(_gradient_tensors(model, optimizer)),
        "optimizer_states": ledger.add_storages(_optimizer_state_tensors(optimizer)),
    }
    offloaded = set(_Ledger().add_storages(zero_offloaded_tensors(optimizer))) if is_zero_optimizer(optimizer) else set()
    figures = {kind: sum(storages.values()) for kind, storages in kinds.items()}
    for kind, storages in kinds.items():
        figures[f"offloaded_{kind}"] = sum(size for key, size in storages.items() if key in offloaded)
    figures["offloaded"] = sum(figures[f"offloaded_{kind}"] for kind in kinds)
    figures["other"] = ledger.add(live_tensors())
    return figures


def gradient_bytes(model: nn.Module, optimizer: Any = None) -> int:
    """The bytes of gradients this rank holds now (the ``gradients`` of ``model_state_bytes``). Called
    after backward and before the optimizer step, it sees them at their peak."""
    return _Ledger().add(_gradient_tensors(model, _inner_optimizer(model, optimizer)))


# ---------------------------------------------------------------- dispatch modes


def _subclass_first(types: Iterable[type]) -> bool:
    """Whether an op has DTensor arguments, which a mode lets DTensor handle first by returning
    NotImplemented, as torch's CommDebugMode does: the ops on local shards and the collectives DTensor
    then issues come back to the mode. Other subclasses run inside the mode's call: the fake tensors of
    DTensor's sharding propagation must not be handed back (their dispatch defers to any mode)."""
    return any(issubclass(cls, DTensor) for cls in types)


# ---------------------------------------------------------------- peak memory


def _tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors in an op's result: a tensor, or tuples and lists of them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors_in(item)


class MemoryTracker(TorchDispatchMode):
    """The bytes of live tensor storages while it is active, and their peak.

    On entering, it counts the storages of ``live_tensors()``; then every storage an op makes,
    whichever code runs the op (autograd, DDP's reducer, DeepSpeed's hooks and optimizer, DTensor's
    local ops), and it subtracts each storage when torch frees it (a weak reference to the
    storage's Python object, which torch keeps alive as long as any tensor uses the storage).
    A storage resized in place (``UntypedStorage.resize_``, which no dispatcher sees: FSDP2 frees
    and re-allocates its gathered parameters that way) is counted at its new size.
    Memory a kernel uses inside one op and tensors made before it by C++ alone are not seen.
    Enter it before the model is built to see the latter too.

    Attributes:
        live: bytes of the storages alive now.
        peak: the most ``live`` has been since it was entered or since ``reset_peak``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}
        self._references: dict[int, weakref.ref] = {}
        # Storages may be freed on another thread (a communication backend's), or inside _track.
        self._lock = threading.RLock()

    def __enter__(self) -> MemoryTracker:
        for tensor in live_tensors():
            self._track(tensor)
        _watch_resizes(self)
        return super().__enter__()

    def __exit__(self, *exception: Any) -> Any:
        _unwatch_resizes(self)
        return super().__exit__(*exception)

    def reset_peak(self) -> None:
        """Starts a new peak from what is alive now."""
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if _subclass_first(types):
            return NotImplemented
        result = func(*args, **(kwargs or {}))
        for tensor in _tensors_in(result):
            self._track(tensor)
        return result

    def _track(self, tensor: torch.Tensor) -> None:
        storage = _storage(tensor)
        if storage is not None:
            self._track_storage(storage)

    def _resized(self, storage: torch.UntypedStorage) -> None:
        """Counts ``storage`` at the size ``resize_`` gave it (nothing, once resized to 0 bytes)."""
        with self._lock:
            if id(storage) in self._sizes or storage.nbytes():
                self._track_storage(storage)

    def _track_storage(self, storage: torch.UntypedStorage) -> None:
        key, size = id(storage), storage.nbytes()
        with self._lock:
            before = self._sizes.get(key)
            if before is None:
                self._references[key] = weakref.ref(storage, partial(self._release, key))
            self._sizes[key] = size  # an op may also resize a storage it was given
            self.live += size - (before or 0)
            self.peak = max(self.peak, self.live)

    def _release(self, key: int, _reference: weakref.ref) -> None:
        with self._lock:
            self.live -= self._sizes.pop(key, 0)
            self._references.pop(key, None)


# The trackers entered now, which in-place storage resizes must reach; torch's own resize_ while none is.
_RESIZE_WATCHERS: list[MemoryTracker] = []
_TORCH_RESIZE = torch.UntypedStorage.resize_
_RESIZE_IS_OWN = "resize_" in vars(torch.UntypedStorage)  # else inherited from torch._C.StorageBase


def _watched_resize(storage: torch.UntypedStorage, size: int) -> Any:
    result = _TORCH_RESIZE(storage, size)
    for tracker in list(_RESIZE_WATCHERS):
        tracker._resized(storage)
    return result


def _watch_resizes(tracker: MemoryTracker) -> None:
    """Routes ``UntypedStorage.resize_`` through ``tracker`` while it is entered (its public method, wrapped)."""
    if not _RESIZE_WATCHERS:
        torch.UntypedStorage.resize_ = _watched_resize
    _RESIZE_WATCHERS.append(tracker)


def _unwatch_resizes(tracker: MemoryTracker) -> None:
    if tracker in _RESIZE_WATCHERS:
        _RESIZE_WATCHERS.remove(tracker)
    if not _RESIZE_WATCHERS:
        if _RESIZE_IS_OWN:
            torch.UntypedStorage.resize_ = _TORCH_RESIZE
        else:
            del torch.UntypedStorage.resize_


def peak_step_memory(step: Callable[[], Any], tracker: MemoryTracker | None = None) -> dict[str, int]:
    """Runs ``step()`` (forward, backward, optimizer step, zero_grad) and measures its memory.

    Args:
        step: the training step.
        tracker: an active MemoryTracker to measure with (entered before the model was built, it
            also counts what C++ alone made before); by default one entered for this step.

    Returns:
        ``baseline``: bytes of live tensors before the step; ``peak``: the most alive at any moment
        during it; ``end``: alive after it.
    """
    if tracker is None:
        gc.collect()  # garbage left by earlier code is not part of the baseline
        with MemoryTracker() as tracker:
            return _measure(step, tracker)
    return _measure(step, tracker)


def _measure(step: Callable[[], Any], tracker: MemoryTracker) -> dict[str, int]:
    gc.collect()
    baseline = tracker.live
    tracker.reset_peak()
    step()
    return {"baseline": baseline, "peak": tracker.peak, "end": tracker.live}


# ---------------------------------------------------------------- communication


def sent_bytes(call: CollectiveCall) -> int:
    """The bytes this rank sends for one collective, by the convention of ring algorithms, for a group of
    n ranks and a payload of M bytes (see CollectiveCall.payload):

    - all-reduce 2(n-1)/n M; all-gather (M the whole output) and reduce-scatter (M the whole input)
      (n-1)/n M; all-to-all M less the part that stays here ((n-1)/n M for even splits);
    - broadcast and scatter: the root sends M (less its own part, for scatter), the others nothing;
    - reduce and gather: every rank but the root sends M, the root nothing;
    - send M; recv, barrier and any collective in a group of one, nothing.
    """
    n, payload = call.group_size, call.payload
    if call.kind == "send":
        return payload
    if n <= 1:
        return 0
    is_root = call.group_rank == call.root
    if call.kind == "all_reduce":
        return 2 * (n - 1) * payload // n
    if call.kind in ("all_gather", "reduce_scatter"):
        return (n - 1) * payload // n
    if call.kind == "all_to_all":
        return payload - call.kept if call.kept is not None else (n - 1) * payload // n
    if call.kind == "broadcast":
        return payload if is_root else 0
    if call.kind == "scatter":
        return payload - (call.kept or 0) if is_root else 0
    if call.kind in ("reduce", "gather"):
        return 0 if is_root else payload
    return 0


@dataclass
class CommunicationCount:
    """The collectives a rank issued inside ``count_communication``.

    Attributes:
        bytes: what it sent, in all (see ``sent_bytes``).
        calls: per op (``"c10d::allreduce_"``): how many calls and the bytes they sent.
        unknown: ops of a collective namespace whose arguments meshplan does not read, with their
            number of calls (their bytes are not counted: a test should expect none).
    """

    bytes: int = 0
    calls: dict[str, tuple[int, int]] = field(default_factory=dict)
    unknown: dict[str, int] = field(default_factory=dict)

    def add(self, call: CollectiveCall) -> None:
        """Counts one collective."""
        if call.kind == "unknown":
            self.unknown[call.op] = self.unknown.get(call.op, 0) + 1
            return
        sent = sent_bytes(call)
        count, total = self.calls.get(call.op, (0, 0))
        self.calls[call.op] = (count + 1, total + sent)
        self.bytes += sent


class _CollectiveCounter(TorchDispatchMode):
    """Counts every collective op dispatched while it is active. torch.distributed's functions, DDP's
    reducer (in C++) and DeepSpeed all reach c10d's ops through the dispatcher, and DTensor its
    functional collectives once it has run (a subclass gets the op first)."""

    def __init__(self, count: CommunicationCount) -> None:
        super().__init__()
        self.count = count

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's protocol
        if _subclass_first(types):
            return NotImplemented
        call = read_collective(func, args, kwargs)
        if call is not None:
            self.count.add(call)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def count_communication() -> Iterator[CommunicationCount]:
    """Counts the collectives this rank issues inside the block and the bytes it sends.

    Example::

        with count_communication() as sent:
            accelerator.backward(model(**batch).loss)
            optimizer.step()
        print(sent.bytes, sent.calls)
    """
    count = CommunicationCount()
    with _CollectiveCounter(count):
        yield count
