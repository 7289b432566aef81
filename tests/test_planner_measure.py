"""meshplan.planner.measure: what a training step holds and sends, measured where it runs.

The estimator is checked against these figures (tests/scripts/planner_measure.py measures every
layout); here each measuring tool is checked on cases whose answer is known by hand: a plain
model and AdamW, a known pattern of allocations, collectives of a known size.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import nn

from meshplan._compat.torch import CollectiveCall
from meshplan.planner.measure import (
    MemoryTracker, count_communication, gradient_bytes, live_tensor_bytes, model_state_bytes, peak_step_memory, sent_bytes,
)
from meshplan.testing import spawn


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(100, 200), nn.ReLU(), nn.Linear(200, 10))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, zero_grad: bool = True) -> None:
    model(torch.ones(8, 100)).square().mean().backward()
    optimizer.step()
    if zero_grad:
        optimizer.zero_grad()


# ---------------------------------------------------------------- model states


def test_a_plain_model_with_adamw_holds_4_bytes_a_parameter_in_weights_and_gradients_and_8_in_states() -> None:
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    _train_step(model, optimizer, zero_grad=False)
    numel = sum(parameter.numel() for parameter in model.parameters())
    held = model_state_bytes(model, optimizer)
    # AdamW keeps two fp32 moments per element and one fp32 step count per tensor.
    assert held["parameters"] == 4 * numel
    assert held["gradients"] == 4 * numel
    assert held["optimizer_states"] == 8 * numel + 4 * len(list(model.parameters()))
    assert held["offloaded"] == 0
    assert held["other"] >= 0


def test_an_optimizer_is_read_through_the_wrappers_of_the_front_ends() -> None:
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    _train_step(model, optimizer, zero_grad=False)
    assert model_state_bytes(model, LightningOptimizer(optimizer)) == model_state_bytes(model, optimizer)


def test_a_storage_viewed_by_several_parameters_is_counted_once() -> None:
    # As ZeRO's flat buffers: every parameter a view of one storage of 30 floats.
    flat = torch.zeros(30)
    model = nn.Module()
    model.first = nn.Parameter(flat[:10])
    model.second = nn.Parameter(flat[10:].view(4, 5))
    assert model_state_bytes(model)["parameters"] == 120


def test_gradients_are_counted_while_they_exist() -> None:
    model = _mlp()
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(8, 100)).sum().backward()
    assert gradient_bytes(model, optimizer) == 4 * sum(parameter.numel() for parameter in model.parameters())
    optimizer.zero_grad()  # set to None
    assert gradient_bytes(model, optimizer) == 0


def test_live_tensors_are_counted_once_per_storage() -> None:
    before = live_tensor_bytes()
    block = torch.zeros(250_000)
    views = [block[:10], block.view(500, 500)]
    assert live_tensor_bytes() - before == 1_000_000
    del block, views


# ---------------------------------------------------------------- peak memory


def test_the_peak_is_the_largest_total_alive_during_the_step() -> None:
    kept = []

    def step() -> None:
        first = torch.empty(1000)  # 4000 bytes
        second = torch.empty(2000)  # 8000: 12000 alive, the peak
        del first
        kept.append(torch.empty(500))  # 2000, still alive after the step
        del second

    memory = peak_step_memory(step)
    assert memory["peak"] - memory["baseline"] == 12_000
    assert memory["end"] - memory["baseline"] == 2_000


def test_the_peak_of_a_linear_step_is_its_weight_gradient() -> None:
    # Worked by hand: the output (40 kB) is freed once summed, before backward; the weight's
    # gradient (4 MB) then lives until zero_grad; plain SGD updates in place. Two scalars
    # (the loss and its gradient) come on top.
    torch.manual_seed(0)
    layer = nn.Linear(1000, 1000, bias=False)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.1)
    inputs = torch.randn(10, 1000)

    def step() -> None:
        layer(inputs).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    memory = peak_step_memory(step)
    assert 4_000_000 <= memory["peak"] - memory["baseline"] <= 4_000_000 + 64
    assert memory["end"] == memory["baseline"]


def test_a_storage_resized_in_place_is_counted_at_its_new_size() -> None:
    # FSDP2 frees its gathered parameters with UntypedStorage.resize_(0), which no dispatch mode sees.
    block = torch.zeros(1000)
    resize = torch.UntypedStorage.resize_
    with MemoryTracker() as tracker:
        before = tracker.live
        block.untyped_storage().resize_(0)
        assert tracker.live == before - 4000
        block.untyped_storage().resize_(8000)
        assert tracker.live == before + 4000 and tracker.peak == before + 4000
    assert torch.UntypedStorage.resize_ == resize  # torch's own again


# ---------------------------------------------------------------- communication


@pytest.mark.parametrize(("kind", "rank", "root", "kept", "sent"), [
    ("all_reduce", 1, None, None, 1500),  # 2(n-1)/n M
    ("all_gather", 1, None, None, 750),  # (n-1)/n of the whole output
    ("reduce_scatter", 1, None, None, 750),  # (n-1)/n of the whole input
    ("all_to_all", 1, None, None, 750),
    ("all_to_all", 1, None, 100, 900),  # uneven splits: all but the part that stays
    ("broadcast", 2, 2, None, 1000), ("broadcast", 1, 2, None, 0),  # the root sends
    ("scatter", 2, 2, 250, 750), ("scatter", 1, 2, None, 0),
    ("reduce", 2, 2, None, 0), ("reduce", 1, 2, None, 1000),  # every rank but the root sends
    ("gather", 2, 2, None, 0), ("gather", 1, 2, None, 1000),
    ("send", 1, None, None, 1000), ("recv", 1, None, None, 0), ("barrier", 1, None, None, 0),
])
def test_bytes_sent_follow_the_ring_convention(kind: str, rank: int, root: int | None, kept: int | None, sent: int) -> None:
    call = CollectiveCall(f"c10d::{kind}", kind, payload=1000, group_size=4, group_rank=rank, root=root, kept=kept)
    assert sent_bytes(call) == sent


def test_a_collective_in_a_group_of_one_sends_nothing() -> None:
    assert sent_bytes(CollectiveCall("c10d::allreduce_", "all_reduce", 1000, 1, 0)) == 0


def test_collectives_are_counted_by_op_in_a_group_of_one(tmp_path: Path) -> None:
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        tensor = torch.ones(10)
        with count_communication() as sent:
            dist.all_reduce(tensor)
            dist.broadcast(tensor, src=0)
            dist.all_gather_into_tensor(torch.empty(10), tensor)
            torch.mul(tensor, 2)  # no collective
    finally:
        dist.destroy_process_group()
    assert sent.calls == {"c10d::allreduce_": (1, 0), "c10d::broadcast_": (1, 0), "c10d::_allgather_base_": (1, 0)}
    assert sent.bytes == 0 and sent.unknown == {}


def two_rank_measurements() -> dict:
    """On each of 2 ranks: the bytes sent by DDP's reducer and by DTensor's collectives, and what a
    column-sharded layer holds."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    dist.init_process_group("gloo")
    try:
        result = {}
        model = nn.parallel.DistributedDataParallel(nn.Linear(64, 32))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(3):  # the second step rebuilds DDP's buckets, rank 0 broadcasting their order
            with count_communication() as sent:
                model(torch.ones(4, 64)).sum().backward()
                optimizer.step()
            optimizer.zero_grad()
        result["ddp"] = (sent.bytes, sent.calls)
        mesh = init_device_mesh("cpu", (2,))
        sharded = distribute_tensor(torch.ones(8, 4), mesh, [Shard(0)])
        with count_communication() as sent:
            sharded.full_tensor()  # gathers 128 bytes
        result["all_gather"] = (sent.bytes, sorted(sent.calls))
        partial = DTensor.from_local(torch.ones(4), mesh, [Partial()])
        with count_communication() as sent:
            partial.redistribute(mesh, [Replicate()]).to_local()  # reduces 16 bytes
        result["all_reduce"] = (sent.bytes, sorted(sent.calls))
        torch.manual_seed(0)
        layer = parallelize_module(nn.Linear(64, 32), mesh, ColwiseParallel())
        layer_optimizer = torch.optim.AdamW(layer.parameters())
        layer(torch.ones(4, 64)).sum().backward()
        layer_optimizer.step()
        result["sharded"] = model_state_bytes(layer, layer_optimizer)
        return result
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # starts 2 processes
def test_collectives_of_ddp_and_dtensor_are_counted_and_dtensor_shards_measured() -> None:
    ranks = spawn(two_rank_measurements, 2, timeout=120)
    numel = 64 * 32 + 32
    for result in ranks:
        ddp_bytes, ddp_calls = result["ddp"]
        # DDP's C++ reducer all-reduces the fp32 gradients: 2(n-1)/n of 4 bytes a parameter, n = 2.
        assert ddp_bytes == 4 * numel and ddp_calls == {"c10d::allreduce_": (1, 4 * numel)}
        assert result["all_gather"][0] == 64, result["all_gather"]  # half of the 128-byte whole
        assert result["all_reduce"][0] == 16, result["all_reduce"]
        # Half the columns on each rank: weight 16x64 and bias 16 in fp32, and AdamW's two moments of each.
        half = 4 * numel // 2
        assert result["sharded"]["parameters"] == half and result["sharded"]["gradients"] == half
        assert result["sharded"]["optimizer_states"] == 2 * half + 2 * 4
