"""meshplan.estimate, meshplan.plan_layout and `meshplan plan`: what they predict, choose and refuse.

Accuracy against what the engines really hold is checked by tests/test_planner_accuracy.py
(processes, slow); these check the arithmetic, the choices and the errors, in one process.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import BertConfig, LlamaConfig, LlamaForCausalLM

import meshplan
from meshplan.cli import main
from meshplan.plan import Plan
from meshplan.planner import model_facts
from meshplan.planner.activations import trace_activations


def tiny_llama(**sizes: int) -> LlamaConfig:
    fields = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=512, architectures=["LlamaForCausalLM"])
    fields.update(sizes)
    return LlamaConfig(**fields)


def llama_8b() -> LlamaConfig:
    """Llama-3-8B's published dimensions."""
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, architectures=["LlamaForCausalLM"])


def test_a_config_is_sized_on_the_meta_device_with_every_parameter_once():
    facts = model_facts(llama_8b())
    assert facts.numel == 8_030_261_248
    assert facts.name == "LlamaForCausalLM"


def test_a_model_directory_and_a_module_give_the_same_count(tmp_path):
    config = tiny_llama()
    config.save_pretrained(tmp_path)
    module = LlamaForCausalLM(config)
    counted = sum(p.numel() for p in module.parameters())
    assert model_facts(tmp_path).numel == model_facts(tmp_path / "config.json").numel == model_facts(module).numel == counted


def test_ddp_holds_sixteen_bytes_per_parameter_and_a_bucket_copy_of_the_gradients():
    result = meshplan.estimate(tiny_llama(), meshplan.DDP(), world_size=2, seq_len=32)
    params = model_facts(tiny_llama()).numel
    assert (result.parameters, result.gradients, result.optimizer_states) == (4 * params, 4 * params, 8 * params)
    assert result.buffers >= 4 * params
    # Gradients peak in the optimizer step, activations where the backward pass starts: the peak is
    # the states and buckets plus the larger of the two moments, less than every component added up.
    components = sum(result.bytes_per_rank()[name] for name in meshplan.planner.COMPONENTS)
    assert 4 * params + 8 * params + 4 * params + max(result.activations, 4 * params) <= result.total < components


@pytest.mark.parametrize("stage", [1, 2])
def test_zero_1_and_2_divide_the_optimizer_state_and_keep_only_their_gradient_share(stage):
    # DeepSpeed 0.19.8 reduces gradients through its bucket into each rank's share at stage 1 as at
    # stage 2 (measured: the same bytes), and allocates the whole reduce bucket each backward.
    params = model_facts(llama_8b()).numel
    result = meshplan.estimate(llama_8b(), meshplan.ZeRO(stage=stage), world_size=8)
    assert result.parameters == 2 * params
    assert result.optimizer_states == pytest.approx(12 * params / 8, rel=1e-6)
    assert result.gradients == pytest.approx(2 * params / 8, rel=1e-6)
    bucket = meshplan.estimate(llama_8b(), meshplan.ZeRO(stage=stage, reduce_bucket_size=10**6), world_size=8)
    assert result.buffers - bucket.buffers == 2 * (500_000_000 - 10**6)


def test_zero_3_divides_everything_and_offload_moves_it_to_the_host():
    params = model_facts(llama_8b()).numel
    sharded = meshplan.estimate(llama_8b(), "zero3", world_size=8)
    offloaded = meshplan.estimate(llama_8b(), "zero3-offload", world_size=8)
    assert sharded.model_states == pytest.approx(16 * params / 8, rel=0.01)
    assert offloaded.parameters + offloaded.optimizer_states < sharded.model_states / 100
    assert offloaded.host_bytes >= 14 * params / 8


def test_tp_divides_the_split_layers_and_keeps_the_norms_whole():
    facts = model_facts(llama_8b())
    result = meshplan.estimate(llama_8b(), meshplan.TensorParallel(tp_size=8), world_size=8)
    assert result.layout == "tp" and result.tp_size == 8
    assert facts.numel / 8 * 4 < result.parameters < facts.numel / 8 * 4 * 1.01
    over_pairs = meshplan.estimate(llama_8b(), meshplan.TensorParallel(tp_size=2), world_size=8)
    assert over_pairs.layout == "tp-dp" and over_pairs.parameters == pytest.approx(4 * result.parameters, rel=0.01)


def test_communication_is_what_deepspeed_sends_an_all_reduce_and_a_gather_at_zero_2():
    # Ring convention, 8 ranks, bf16: ZeRO-2 all-reduces the gradients (2 x 7/8) and gathers the
    # parameters (7/8); ZeRO-3 reduce-scatters (7/8), gathers for forward (7/8) and, for a model
    # far beyond stage3_max_reuse_distance, gathers again for backward: the ZeRO paper's 3 copies.
    params = model_facts(llama_8b()).numel
    zero2 = meshplan.estimate(llama_8b(), "zero2", world_size=8)
    zero3 = meshplan.estimate(llama_8b(), "zero3", world_size=8)
    assert zero2.communication_bytes_per_step == pytest.approx(3 * 7 / 8 * 2 * params, rel=1e-6)
    assert 2.8 * 7 / 8 * 2 * params < zero3.communication_bytes_per_step < 3 * 7 / 8 * 2 * params
    kept_gathered = meshplan.estimate(llama_8b(), meshplan.ZeRO(stage=3, stage3_max_reuse_distance=10**11, stage3_max_live_parameters=10**11), world_size=8)
    assert kept_gathered.communication_bytes_per_step == pytest.approx(2 * 7 / 8 * 2 * params, rel=1e-3)


def test_fake_tensor_trace_counts_exactly_what_a_real_forward_pass_saves():
    config = tiny_llama()
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).train()
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in parameter_storages:
            saved[pointer] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, 512, (2, 48))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    trace = trace_activations(model_facts(config), micro_batch_size=2, seq_len=48, dtype=torch.float32, autocast=None)
    assert trace.activations(1, gradient_checkpointing=False) == sum(saved.values())


def test_gradient_checkpointing_and_tp_shrink_the_activations():
    kwargs = dict(world_size=4, seq_len=2048)
    whole = meshplan.estimate(llama_8b(), "zero2", **kwargs)
    recomputed = meshplan.estimate(llama_8b(), "zero2", gradient_checkpointing=True, **kwargs)
    split = meshplan.estimate(llama_8b(), meshplan.TensorParallel(tp_size=4), **kwargs)
    assert recomputed.activations < whole.activations / 4
    assert split.activations < whole.activations


def test_estimate_refuses_a_bad_layout_or_argument_with_a_plan_error():
    with pytest.raises(meshplan.PlanError, match="tp_size=3 does not divide the world size 4"):
        meshplan.estimate(tiny_llama(), meshplan.TensorParallel(tp_size=3), world_size=4)
    with pytest.raises(meshplan.PlanError, match="precision='int3' is unknown"):
        meshplan.estimate(tiny_llama(), "ddp", world_size=2, precision="int3")
    with pytest.raises(meshplan.PlanError, match="seq_len=0 must be a positive integer"):
        meshplan.estimate(tiny_llama(), "ddp", world_size=2, seq_len=0)
    with pytest.raises(meshplan.PlanError, match="tp_size=2 does not divide num_attention_heads=3"):
        meshplan.estimate(BertConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=96),
                          meshplan.TensorParallel(tp_size=2), world_size=2, seq_len=128)
    with pytest.raises(meshplan.PlanError, match="seq_len=2048 is longer than BertForMaskedLM takes .max_position_embeddings=512."):
        meshplan.estimate(BertConfig(hidden_size=48, num_hidden_layers=1, num_attention_heads=3, intermediate_size=96),
                          "ddp", world_size=2)
    with pytest.raises(meshplan.PlanError, match="gradient_checkpointing='no' must be True or False"):
        meshplan.estimate(tiny_llama(), "ddp", world_size=2, gradient_checkpointing="no")


def test_a_small_model_picks_a_replicated_layout_for_speed():
    choice = meshplan.plan_layout(tiny_llama(), devices_per_node=8, device_memory="80GB", seq_len=128)
    assert choice.chosen in ("ddp", "zero1", "zero2")
    assert choice.reason.startswith(f"{choice.chosen} keeps whole weights on every device and fits")
    assert all(candidate.fits for candidate in choice.candidates)


def test_a_model_that_fits_only_sharded_picks_zero3_or_tp():
    choice = meshplan.plan_layout(llama_8b(), devices_per_node=8, device_memory="40GB")
    fits = {c.layout for c in choice.candidates if c.fits}
    assert "ddp" not in fits and "zero1" not in fits
    assert choice.chosen in ("zero3", "tp", "tp-dp")


def test_a_model_that_fits_only_offloaded_picks_offload():
    choice = meshplan.plan_layout(llama_8b(), devices_per_node=8, device_memory="16GB", gradient_checkpointing=True)
    assert [c.layout for c in choice.candidates if c.fits] == ["zero3-offload"]
    assert choice.chosen == "zero3-offload"


def test_a_model_that_fits_nowhere_names_the_memory_and_the_nodes_that_would_fit():
    with pytest.raises(meshplan.PlanError) as refused:
        meshplan.plan_layout(llama_8b(), devices_per_node=8, device_memory="16GB", host_memory="10GB", gradient_checkpointing=True)
    message = str(refused.value)
    assert "No layout fits LlamaForCausalLM (8.03B parameters) in 16.0 GB per device and 10.0 GB of host memory" in message
    # TP x FSDP2 holds the least: TP splits the activations, FSDP2 the states over the other ranks.
    assert "the least any layout needs is tp-fsdp (tp_size 4)'s 20.3 GB, so it fits with 20.3 GB per device" in message
    assert "or on 2 nodes of 8 devices (tp-fsdp (tp_size 8))" in message


def test_when_no_node_count_helps_the_error_says_what_to_change():
    with pytest.raises(meshplan.PlanError, match="no number of nodes up to 128 makes it fit; gradient checkpointing would shrink"):
        meshplan.plan_layout(llama_8b(), devices_per_node=8, device_memory="12GB")


def test_the_cli_prints_the_json_the_issue_specifies(capsys, tmp_path):
    llama_8b().save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--devices", "8", "--device-memory", "80GB", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert set(printed) >= {"chosen", "reason", "candidates"}
    names = {(candidate["layout"], candidate["engine"]) for candidate in printed["candidates"]}
    assert names == {("ddp", "ddp"), ("zero1", "deepspeed"), ("zero2", "deepspeed"), ("zero3", "deepspeed"),
                     ("zero3-offload", "deepspeed"), ("fsdp2", "fsdp2"), ("fsdp2-stage2", "fsdp2"), ("tp", "dtensor"),
                     ("tp-dp", "dtensor"), ("tp-fsdp", "fsdp2")}
    first = printed["candidates"][0]
    assert set(first["bytes_per_rank"]) == {"parameters", "gradients", "optimizer_states", "activations", "buffers", "total"}
    assert {"layout", "tp_size", "engine", "fits", "host_bytes", "communication_bytes_per_step"} <= set(first)
    assert printed["chosen"] == first["layout"]


def test_the_cli_writes_the_choice_as_a_recipe_that_runs_the_same_layout(capsys, tmp_path):
    llama_8b().save_pretrained(tmp_path / "model")
    recipe = tmp_path / "chosen.yaml"
    assert main(["plan", "--model", str(tmp_path / "model"), "--devices", "8", "--device-memory", "40GB",
                 "--write-recipe", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "Chosen:" in printed and "fits" in printed.splitlines()[0]
    plan = meshplan.from_recipe(str(recipe)).plan
    assert plan.option("mixed_precision") == "bf16"
    chosen = printed.split("Chosen: ")[1].split(".")[0].split(" ")[0]
    assert meshplan.planner.layout_name(plan, 8, 8) == chosen


@pytest.mark.parametrize("arguments, message", [
    (["--device-memory", "lots"], "is not a size"),
    (["--device-memory", "1MB"], "No layout fits"),
])
def test_the_cli_refuses_bad_input_with_exit_code_2_and_one_paragraph(capsys, tmp_path, arguments, message):
    tiny_llama().save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--devices", "2", *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("meshplan plan: ") and error.count("\n") == 1


def test_on_cpu_offload_frees_nothing_so_its_host_bytes_count_against_the_memory():
    on_gpus = meshplan.plan_layout(llama_8b(), devices_per_node=8, device_memory="16GB", gradient_checkpointing=True)
    assert on_gpus.chosen == "zero3-offload"
    with pytest.raises(meshplan.PlanError, match="No layout fits"):
        meshplan.plan_layout(llama_8b(), devices_per_node=8, device_memory="16GB", gradient_checkpointing=True, device_is_host=True)


def test_zero_candidates_size_deepspeeds_buckets_to_a_small_model_and_keep_its_defaults_for_a_large_one():
    small = {c.layout: c.plan for c in meshplan.plan_layout(tiny_llama(), devices_per_node=2, device_memory="80GB", seq_len=64).candidates}
    trainable = model_facts(tiny_llama()).trainable_numel
    assert small["zero2"].option("reduce_bucket_size") == trainable
    assert small["zero3"].option("stage3_prefetch_bucket_size") == trainable
    large = {c.layout: c.plan for c in meshplan.plan_layout(llama_8b(), devices_per_node=8, device_memory="80GB").candidates}
    assert large["zero2"].options == () and large["zero3"].options == ()


# ---------------------------------------------------------------- FSDP2: ZeRO on torch's fully_shard, and TP x FSDP2

FSDP2_STAGE3 = Plan("zero", zero_stage=3, engine="fsdp2")
FSDP2_STAGE2 = Plan("zero", zero_stage=2, engine="fsdp2")


def llama_70b() -> LlamaConfig:
    """Llama-3-70B's published dimensions."""
    return LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                       num_key_value_heads=8, vocab_size=128256, architectures=["LlamaForCausalLM"])


def _block_and_root_numel(config: LlamaConfig) -> tuple[int, int]:
    """Elements of one transformer block, and of what lies outside the blocks (embeddings, final norm, head)."""
    facts = model_facts(config)
    block = sum(p.numel for p in facts.parameters if p.name.startswith("model.layers.0."))
    return block, facts.numel - config.num_hidden_layers * block


def test_fsdp2_holds_sixteen_bytes_per_parameter_divided_by_the_ranks_at_stage_2_and_3():
    # fp32 weights, gradients and AdamW's two moments, each split over the 8 ranks (rows padded per rank),
    # in bf16 as in fp32: meshplan's FSDP2 keeps fp32 parameters and casts inside autocast.
    params = model_facts(llama_8b()).numel
    for plan, name in ((FSDP2_STAGE3, "fsdp2"), (FSDP2_STAGE2, "fsdp2-stage2")):
        result = meshplan.estimate(llama_8b(), plan, world_size=8)
        assert result.layout == name and result.tp_size == 1
        assert (result.parameters, result.gradients, result.optimizer_states) == pytest.approx(
            (4 * params / 8, 4 * params / 8, 8 * params / 8), rel=1e-4)


def test_fsdp2_stage_3_gathers_two_blocks_and_the_root_and_stage_2_every_block():
    # At the turn from forward to backward, stage 3 holds the root unit and two blocks gathered (the
    # one whose backward runs and the prefetched one); stage 2 keeps every block gathered since its forward.
    block, _ = _block_and_root_numel(llama_8b())
    stage3 = meshplan.estimate(llama_8b(), FSDP2_STAGE3, world_size=8)
    stage2 = meshplan.estimate(llama_8b(), FSDP2_STAGE2, world_size=8)
    assert stage2.buffers - stage3.buffers == 4 * block * (32 - 2)
    assert stage2.total - stage3.total == 4 * block * (32 - 2)


def test_fsdp2_sends_three_fp32_copies_of_the_model_at_stage_3_and_two_at_stage_2():
    # Ring convention, 8 ranks: reduce-scatter the gradients (7/8), gather for forward (7/8) and, after
    # resharding, again for backward; stage 2 does not reshard after the forward pass.
    params = model_facts(llama_8b()).numel
    stage3 = meshplan.estimate(llama_8b(), FSDP2_STAGE3, world_size=8)
    stage2 = meshplan.estimate(llama_8b(), FSDP2_STAGE2, world_size=8)
    assert stage3.communication_bytes_per_step == pytest.approx(3 * 7 / 8 * 4 * params, rel=1e-9)
    assert stage2.communication_bytes_per_step == pytest.approx(2 * 7 / 8 * 4 * params, rel=1e-9)


def test_tp_fsdp_divides_the_tp_share_again_over_the_data_parallel_ranks():
    replicated = meshplan.estimate(llama_8b(), meshplan.TensorParallel(tp_size=4), world_size=8)
    sharded = meshplan.estimate(llama_8b(), Plan("tp", tp_size=4, data_parallel="shard"), world_size=8)
    params = model_facts(llama_8b()).numel
    assert (sharded.layout, sharded.tp_size, replicated.layout) == ("tp-fsdp", 4, "tp-dp")
    assert sharded.model_states == pytest.approx(16 * params / 8, rel=0.01)
    assert sharded.model_states < 0.52 * replicated.model_states
    # The same TP traffic inside the node; across the 2 data-parallel ranks FSDP2 gathers the TP-local
    # fp32 weights twice and reduce-scatters their gradients: 3 x 1/2 of them.
    assert sharded.tensor_parallel_bytes_per_step == replicated.tensor_parallel_bytes_per_step
    data_parallel = sharded.communication_bytes_per_step - sharded.tensor_parallel_bytes_per_step
    assert data_parallel == pytest.approx(3 / 2 * replicated.parameters, rel=1e-9)


def test_the_candidates_include_fsdp2_and_tp_fsdp_only_where_data_parallel_ranks_remain():
    one_node = meshplan.plan_layout(tiny_llama(), devices_per_node=2, device_memory="80GB", seq_len=64)
    two_nodes = meshplan.plan_layout(tiny_llama(), devices_per_node=2, nodes=2, device_memory="80GB", seq_len=64)
    assert {"fsdp2", "fsdp2-stage2"} <= {c.layout for c in one_node.candidates}
    assert "tp-fsdp" not in {c.layout for c in one_node.candidates}  # TP over both processes leaves none
    plans = {c.layout: c.plan for c in two_nodes.candidates}
    assert plans["fsdp2"] == FSDP2_STAGE3 and plans["fsdp2-stage2"] == FSDP2_STAGE2
    assert plans["tp-fsdp"] == Plan("tp", tp_size=2, data_parallel="shard") and plans["tp-fsdp"].uses_fsdp2
    for candidate in two_nodes.candidates:  # each name is what layout_name calls its plan
        assert meshplan.planner.layout_name(candidate.plan, 4, 2) == candidate.layout


def test_tp_fsdp_makes_70b_fit_where_tp_with_replicated_data_parallelism_does_not():
    choice = meshplan.plan_layout(llama_70b(), devices_per_node=8, nodes=4, device_memory="80GB", gradient_checkpointing=True)
    fits = {(c.layout, c.tp_size): c.fits for c in choice.candidates}
    assert not any(fit for (layout, _), fit in fits.items() if layout in ("tp", "tp-dp", "ddp", "zero1", "zero2"))
    assert fits[("tp-fsdp", 8)]
    # TP inside each node and FSDP2 across the 4 nodes sends the least over the slower inter-node links.
    assert (choice.chosen, choice.tp_size) == ("tp-fsdp", 8) and choice.plan.data_parallel == "shard"


def test_on_equal_footing_deepspeed_comes_before_fsdp2_and_in_bf16_sends_less():
    choice = meshplan.plan_layout(llama_8b(), devices_per_node=8, device_memory="80GB")
    order = [c.layout for c in choice.candidates]
    # DeepSpeed gathers bf16 weights, meshplan's FSDP2 fp32 ones: ZeRO-3 on DeepSpeed ranks first.
    assert order.index("zero3") < order.index("fsdp2") and order.index("zero2") < order.index("fsdp2-stage2")
    assert meshplan.planner.choose.PREFERENCE.index("zero3") < meshplan.planner.choose.PREFERENCE.index("fsdp2")


def test_an_fsdp2_layout_naming_a_class_the_model_lacks_is_refused():
    plan = Plan.build("zero", zero_stage=3, engine="fsdp2", options={"fsdp_layer_classes": "GPT2Block"})
    with pytest.raises(meshplan.PlanError, match="fsdp_layer_classes='GPT2Block' names GPT2Block"):
        meshplan.estimate(tiny_llama(), plan, world_size=2, seq_len=32)
    named = Plan.build("zero", zero_stage=3, engine="fsdp2", options={"fsdp_layer_classes": "LlamaDecoderLayer"})
    assert meshplan.estimate(tiny_llama(), named, world_size=2, seq_len=32) == meshplan.estimate(
        tiny_llama(), FSDP2_STAGE3, world_size=2, seq_len=32)


@pytest.mark.parametrize("recipe, world_size, plan", [
    ("fsdp2", 2, FSDP2_STAGE3), ("tp-fsdp", 4, Plan("tp", tp_size=2, data_parallel="shard"))])
def test_the_catalogues_fsdp2_recipes_are_estimated_under_their_own_names(recipe, world_size, plan):
    result = meshplan.estimate(tiny_llama(), recipe, world_size=world_size, seq_len=32)
    assert result.layout == recipe and result == meshplan.estimate(tiny_llama(), plan, world_size=world_size, seq_len=32)


# ---------------------------------------------------------------- LoRA (peft): frozen weights hold weights only

LLAMA_8B_NUMEL = 8_030_261_248
LLAMA_8B_NORMS = (2 * 32 + 1) * 4096  # two RMSNorms a layer and the final one
LLAMA_8B_EMBEDDING = 128256 * 4096
# LoRA r=8 on q_proj (4096 -> 4096) and v_proj (4096 -> 1024, 8 KV heads of 128) in each of the 32 layers.
LORA_A = 32 * 2 * (8 * 4096)
LORA_B = 32 * (4096 * 8 + 1024 * 8)
LORA_TRAINABLE = LORA_A + LORA_B


def lora_llama_8b():
    """Llama-3-8B on the meta device with LoRA r=8 on q and v, as ``meshplan plan --lora`` sizes it."""
    from meshplan.planner.model import with_lora

    return with_lora(model_facts(llama_8b()), r=8, targets="q,v")


def test_a_lora_model_on_the_meta_device_trains_only_its_adapters():
    facts = lora_llama_8b()
    assert (facts.numel, facts.trainable_numel) == (LLAMA_8B_NUMEL + LORA_TRAINABLE, LORA_TRAINABLE)
    assert facts.description == "LlamaForCausalLM with LoRA r=8 on q_proj, v_proj"


def test_under_lora_frozen_weights_hold_weights_only_and_the_adapters_sixteen_bytes_in_every_layout():
    # Per rank of 8, by what each engine holds (see planner/memory.py): DDP keeps fp32 weights and the
    # adapters' fp32 gradients and AdamW moments; DeepSpeed casts every weight, frozen ones too, to bf16
    # and keeps bf16 gradients and an fp32 master copy and moments of the adapters' partition alone;
    # ZeRO-1/2 keep the frozen base whole on every rank, ZeRO-3 partitions it (parameters of at most
    # 1e5 elements, norms and adapters here, stay whole); TP splits the base and lora_B of a colwise
    # layer (q, v) and keeps lora_A whole.
    facts, numel, trainable = lora_llama_8b(), LLAMA_8B_NUMEL + LORA_TRAINABLE, LORA_TRAINABLE
    tp_trainable = LORA_A + LORA_B // 8
    expected = {
        "ddp": (4 * numel, 4 * trainable, 8 * trainable),
        "zero2": (2 * numel, 2 * trainable // 8, 12 * trainable // 8),
        "zero3": (2 * (numel // 8 + LLAMA_8B_NORMS + trainable), 2 * trainable // 8, 12 * trainable // 8),
        "tp": (4 * ((LLAMA_8B_NUMEL - LLAMA_8B_NORMS) // 8 + LLAMA_8B_NORMS + tp_trainable), 4 * tp_trainable, 8 * tp_trainable),
    }
    layouts = {"ddp": "ddp", "zero2": "zero2", "zero3": "zero3", "tp": meshplan.TensorParallel(tp_size=8)}
    for name, layout in layouts.items():
        result = meshplan.estimate(facts, layout, world_size=8)
        assert (result.parameters, result.gradients, result.optimizer_states) == expected[name], name
        full = meshplan.estimate(llama_8b(), layout, world_size=8)
        assert result.gradients + result.optimizer_states < (full.gradients + full.optimizer_states) / 100, name


def test_under_lora_only_the_adapters_gradients_are_reduced_and_zero_3_still_gathers_the_frozen_weights():
    facts, trainable, base = lora_llama_8b(), LORA_TRAINABLE, LLAMA_8B_NUMEL
    ring = 7 / 8  # of the whole tensor, per rank, for a gather or a reduce-scatter over 8 ranks
    assert meshplan.estimate(facts, "ddp", world_size=8).communication_bytes_per_step == pytest.approx(2 * ring * 4 * trainable)
    # ZeRO-2 all-reduces the adapters' bf16 gradients and gathers back only them: the frozen base is whole already.
    assert meshplan.estimate(facts, "zero2", world_size=8).communication_bytes_per_step == pytest.approx(3 * ring * 2 * trainable)
    # ZeRO-3 gathers every weight for the forward pass and again for the backward pass, except those of
    # the layers no gradient reaches: the embedding, and the first layer's q, k and v projections (their
    # input needs no gradient, their weights do not train). It reduce-scatters the adapters' gradients alone.
    unreached = LLAMA_8B_EMBEDDING + 4096 * 4096 + 2 * 1024 * 4096
    full = meshplan.estimate(llama_8b(), "zero3", world_size=8).communication_bytes_per_step
    lora = meshplan.estimate(facts, "zero3", world_size=8).communication_bytes_per_step
    assert lora == pytest.approx(full + ring * 2 * (2 * trainable - base - unreached), rel=1e-9)


def test_a_live_lora_model_and_one_built_on_the_meta_device_are_planned_alike():
    from meshplan.peft import lora_model
    from meshplan.planner.model import with_lora

    torch.manual_seed(0)
    live = lora_model(LlamaForCausalLM(tiny_llama()), r=4, targets="q,v,down", task_type="CAUSAL_LM")
    meta = with_lora(model_facts(tiny_llama()), r=4, targets="q,v,down")
    for layout in ("zero2", "zero3", meshplan.TensorParallel(tp_size=2)):
        assert meshplan.estimate(live, layout, world_size=2, seq_len=32) == meshplan.estimate(meta, layout, world_size=2, seq_len=32)


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, torch.bfloat16), (torch.bfloat16, None)])
def test_the_trace_of_a_lora_model_counts_exactly_what_its_real_forward_pass_saves(dtype, autocast):
    # Frozen layers save less (no input for a weight gradient), adapters add their own; under autocast
    # a frozen weight's bf16 copy is made at each use and saved where a gradient flows through it.
    from meshplan.peft import lora_model

    torch.manual_seed(0)
    model = lora_model(LlamaForCausalLM(tiny_llama()), r=4, targets="q,v,down", task_type="CAUSAL_LM").to(dtype).train()
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameter_storages:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    ids = torch.randint(0, 512, (2, 48))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=autocast or dtype,
                                                                                     enabled=autocast is not None):
        model(input_ids=ids, labels=ids)
    trace = trace_activations(model_facts(model), micro_batch_size=2, seq_len=48, dtype=dtype, autocast=autocast)
    copies = trace.outside.weight_copies + trace.num_layers * trace.per_layer.weight_copies
    assert trace.activations(1, gradient_checkpointing=False) + copies == sum(saved.values())
    whole = trace_activations(model_facts(tiny_llama()), micro_batch_size=2, seq_len=48, dtype=dtype, autocast=autocast)
    assert trace.activations(1, gradient_checkpointing=False) < whole.activations(1, gradient_checkpointing=False)


def test_zero_candidates_size_the_reduce_bucket_to_the_adapters_and_the_prefetch_to_the_whole_model():
    # Only gradients pass through the reduce bucket; ZeRO-3 prefetches frozen weights as the others.
    from meshplan.peft import lora_model
    from meshplan.planner.choose import bucket_options

    assert bucket_options(lora_llama_8b()) == {1: {"reduce_bucket_size": LORA_TRAINABLE}, 2: {"reduce_bucket_size": LORA_TRAINABLE},
                                               3: {"reduce_bucket_size": LORA_TRAINABLE}}
    small = model_facts(lora_model(LlamaForCausalLM(tiny_llama()), targets="q,v", task_type="CAUSAL_LM"))
    assert bucket_options(small)[3] == {"reduce_bucket_size": small.trainable_numel, "stage3_prefetch_bucket_size": small.numel}


def test_the_cli_plans_for_lora_and_says_so(capsys, tmp_path):
    llama_8b().save_pretrained(tmp_path)
    common = ["plan", "--model", str(tmp_path), "--devices", "8", "--device-memory", "80GB"]
    assert main([*common, "--lora", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"] == {"name": "LlamaForCausalLM", "description": "LlamaForCausalLM with LoRA r=8 on q_proj, v_proj",
                                "parameters": LLAMA_8B_NUMEL + LORA_TRAINABLE, "trainable_parameters": LORA_TRAINABLE}
    zero2 = next(c for c in printed["candidates"] if c["layout"] == "zero2")
    assert zero2["bytes_per_rank"]["optimizer_states"] == 12 * LORA_TRAINABLE // 8
    assert main([*common, "--lora", "--lora-r", "16", "--lora-targets", "k,o"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    # 32 layers of k_proj (4096 -> 1024) and o_proj (4096 -> 4096) adapters of rank 16: 6.82M parameters.
    assert 32 * (16 * 4096 + 1024 * 16 + 16 * 4096 + 4096 * 16) == 6_815_744
    assert first.startswith("LlamaForCausalLM with LoRA r=16 on k_proj, o_proj: 8.04B parameters, 6.82M of them trained")


@pytest.mark.parametrize("arguments, message", [
    (["--lora", "--lora-targets", "q,nonsense"], "LoRA target 'nonsense' matches no nn.Linear layer of LlamaForCausalLM"),
    (["--lora", "--lora-r", "0"], "LoRA needs a rank of at least 1"),
    (["--lora-r", "4"], "add --lora to plan for them"),
])
def test_the_cli_refuses_lora_options_it_cannot_use(capsys, tmp_path, arguments, message):
    tiny_llama().save_pretrained(tmp_path)
    assert main(["plan", "--model", str(tmp_path), "--devices", "2", "--device-memory", "80GB", *arguments]) == 2
    error = capsys.readouterr().err
    assert message in error and error.startswith("meshplan plan: ")
