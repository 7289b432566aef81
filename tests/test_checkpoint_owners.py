"""Tier 1: which rank writes each tensor of a checkpoint (meshplan.checkpoint.sharded).

Every rank computes the same assignment on its own, without a collective: each tensor goes to
exactly one rank, and the bytes each rank writes stay within one tensor of each other.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from helpers.parity import tiny_llama_config
from meshplan.checkpoint.engines import Entry, model_entries
from meshplan.checkpoint.sharded import _balanced_owners
from meshplan.checkpoint.tensor_files import tensor_bytes

HEADER_BYTES = 64  # what the assignment counts for each tensor's header entry


def _llama_entries() -> list[Entry]:
    """The tensors of a tiny Llama's state dict, of many sizes and two dtypes."""
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))
    model.model.norm.to(torch.float64)
    return model_entries("model", model)[0]


def _bytes(entry: Entry) -> int:
    return tensor_bytes(entry.shape, entry.dtype) + HEADER_BYTES


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
def test_every_tensor_is_written_by_exactly_one_rank(world: int) -> None:
    entries = _llama_entries()
    # What each rank would compute by itself: the same answer everywhere.
    per_rank = [_balanced_owners(entries, world) for _ in range(world)]
    assert all(owners == per_rank[0] for owners in per_rank)
    owners = per_rank[0]
    written = {rank: {entry.key for entry, owner in zip(entries, owners) if owner == rank} for rank in range(world)}
    assert sorted(key for keys in written.values() for key in keys) == sorted(entry.key for entry in entries)
    assert all(written[rank] for rank in range(world))  # more tensors than ranks: every rank writes some


@pytest.mark.parametrize("world", [2, 3, 4, 7])
def test_the_bytes_each_rank_writes_are_balanced_within_the_largest_tensor(world: int) -> None:
    entries = _llama_entries()
    load = [0] * world
    for entry, owner in zip(entries, _balanced_owners(entries, world)):
        load[owner] += _bytes(entry)
    largest = max(_bytes(entry) for entry in entries)
    assert max(load) - min(load) <= largest, (load, largest)


def test_one_huge_tensor_goes_alone_and_the_rest_share_the_other_ranks() -> None:
    def entry(key: str, elements: int) -> Entry:
        return Entry(key, (elements,), torch.float32, lambda: torch.zeros(elements), False)

    entries = [entry("huge", 1_000_000)] + [entry(f"small{index}", 1000) for index in range(6)]
    owners = _balanced_owners(entries, 3)
    assert owners[0] not in owners[1:]
    assert sorted(owners[1:].count(rank) for rank in set(owners[1:])) == [3, 3]
