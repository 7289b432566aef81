"""What meshplan costs: step time of each layout through each front end against the engine driven by hand.

    python bench/overhead.py [--layouts ddp zero2 ...] [--front-ends lightning accelerate trainer]
                             [--repeats 3] [--steps 3] [--warm-up 2] [--json bench/results/overhead.json]
    python bench/overhead.py --gpu    # on a CUDA machine: bf16, a ~1B Llama, every GPU, tokens/s, MFU, peak memory

One launch of workers per process count (2 gloo CPU processes of one thread; 4 for tp-dp and
tp-fsdp, which need a data-parallel dimension beside TP's) trains, layout after layout, the same
Llama of 20M parameters (built from its config, seed 0) on the same batches (2 sequences of 64
tokens per data-parallel rank), again and again, in turn:

- ``native``: the engine driven by hand, as a user writing it without meshplan would: torch's
  DistributedDataParallel; DeepSpeed's own ``deepspeed.initialize`` loop with a config written out
  here (the ZeRO stage, the batch size, no clipping; meshplan writes the same DeepSpeed defaults); torch's
  ``fully_shard`` per decoder layer and on the root; ``parallelize_module`` with torch's
  Colwise/RowwiseParallel on the Llama's attention and MLP, the embedding and the head (the plan
  meshplan applies to a Llama, written out by hand as torchtitan writes it); both for TP x FSDP2; for TP x DP, TP
  and one all-reduce per parameter of its gradient over the data-parallel replicas.
- ``lightning``: a LightningModule around the model, ``Trainer(strategy=<meshplan strategy>)``.
- ``accelerate``: ``meshplan.accelerator(strategy)``, ``prepare``, ``backward``, ``step``.
- ``trainer``: the HF Trainer with ``strategy.training_arguments()`` (DDP and ZeRO: the Trainer runs
  no TP or FSDP2 on CPU).

A repeat runs every runner once (the order rotates between repeats, so no runner always comes
first); each run trains ``--warm-up`` untimed steps and ``--steps`` timed ones, and a step is
forward, backward, optimizer step and zero_grad between two barriers (its time is the slowest
rank's; data loading falls outside it). Per repeat, a front end's ratio is its median step time
over the native engine's in that repeat; the table gives the median ratio over the repeats with
its minimum and maximum, so that the machine's noise shows, and ``best``, the ratio of the two
fastest steps over all repeats (interruptions by the machine only add time). The native, Lightning and Accelerate
runs see the same batches from the same weights, and the table gives the largest difference
between their losses and the native run's, which says that they did the same work (the Trainer
draws its own batches: no loss check).

Writes every step time to the JSON. ``--gpu`` measures on every visible GPU (nccl; a world of
one process when there is one GPU, where TP does not run) in bf16 on a Llama of about 1.1B
parameters, and adds tokens/s, MFU (model FLOPs per second over the GPU's dense bf16 peak) and
the peak memory per rank to the table.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import LAYOUTS, LLAMA_20M, ROOT, launch, runs_on, slowest_per_step, spread, strategy, tp_size, write_rank_records  # noqa: E402
from common import pyplot as plots, write_results  # noqa: E402

FRONT_ENDS = ("lightning", "accelerate", "trainer")
RUNNERS = ("native", *FRONT_ENDS)
DEFAULT_LAYOUTS = ("ddp", "zero2", "zero3", "fsdp2", "tp", "tp-fsdp")
# The HF Trainer runs DDP and DeepSpeed; TP and FSDP2 it runs only on GPUs (meshplan refuses them on CPU), untested there.
TRAINER_LAYOUTS = ("ddp", "zero1", "zero2", "zero3")
LEARNING_RATE = 1e-4
# A TinyLlama-shaped model of 1.1B parameters for --gpu.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                vocab_size=32000, max_position_embeddings=2048, attention_dropout=0.0)
# Dense bf16 peak FLOPs per second by GPU name (NVIDIA's data sheets), for MFU; --peak-tflops overrides.
# The first name the GPU's contains wins: the H100 PCIe before the SXM's "H100".
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12}


# ---------------------------------------------------------------- settings of one run


class Setting:
    """What every runner of one launch shares: the model, the batches, the device and the precision."""

    def __init__(self, arguments: argparse.Namespace):
        import torch

        self.gpu = arguments.gpu
        self.model = LLAMA_1B if self.gpu else LLAMA_20M
        self.seq_len, self.micro_batch = arguments.seq_len, arguments.micro_batch
        self.steps, self.warm_up = arguments.steps, arguments.warm_up
        self.bf16 = self.gpu or arguments.bf16
        self.world_size, self.rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device("cuda", self.local_rank) if self.gpu else torch.device("cpu")
        self.folder = arguments.output.parent
        self.reshard_root = arguments.reshard_native_root

    def data_parallel(self, layout: str) -> tuple[int, int]:
        """This rank's data-parallel index and the data-parallel size; rank = dp_rank * tp_size + tp_rank."""
        size = tp_size(layout, self.world_size)
        return self.rank // size, self.world_size // size

    def global_tokens(self, layout: str) -> Any:
        """Every step's micro-batches of every data-parallel rank, in order: rows [step, dp_rank] (seed 1)."""
        import torch

        _, dp_size = self.data_parallel(layout)
        rows = (self.warm_up + self.steps) * dp_size * self.micro_batch
        return torch.randint(0, self.model["vocab_size"], (rows, self.seq_len), generator=torch.Generator().manual_seed(1))

    def rank_batches(self, layout: str) -> list[Any]:
        """This rank's micro-batch of every step."""
        dp_rank, dp_size = self.data_parallel(layout)
        tokens = self.global_tokens(layout).view(-1, dp_size, self.micro_batch, self.seq_len)
        return list(tokens[:, dp_rank])

    def build_model(self) -> Any:
        """The Llama, seed 0, built on the device (fp32 weights, as every layout starts)."""
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        with self.device:
            return LlamaForCausalLM(LlamaConfig(**self.model))


class Clock:
    """Times steps between barriers (after the GPU's queued work), skipping the warm-up steps; keeps the losses."""

    def __init__(self, setting: Setting):
        self.setting, self.seconds, self.losses = setting, [], []
        self.steps, self.started = 0, 0.0

    def _synchronize(self) -> None:
        import torch
        import torch.distributed as dist

        if self.setting.gpu:
            torch.cuda.synchronize()
        dist.barrier()

    def start(self) -> None:
        self._synchronize()
        self.started = time.perf_counter()

    def stop(self, loss: Any = None) -> None:
        """Ends a step; ``loss`` (a tensor) is read after the clock stops."""
        self._synchronize()
        elapsed = time.perf_counter() - self.started
        self.steps += 1
        if self.steps > self.setting.warm_up:
            self.seconds.append(elapsed)
        if loss is not None:
            self.losses.append(float(loss))


# ---------------------------------------------------------------- the engines by hand


def llama_tp_plan(model: Any, *, loss_parallel: bool = False) -> dict[str, Any]:
    """torch's parallel styles for a Llama: Megatron's split of attention and MLP, the embedding split by rows,
    the head by columns with its output gathered (the plan meshplan applies to a Llama, as torchtitan writes it)."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),
                            "lm_head": ColwiseParallel(output_layouts=Replicate())}
    for index in range(len(model.model.layers)):
        block = f"model.layers.{index}"
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[f"{block}.{name}"] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[f"{block}.{name}"] = RowwiseParallel()
    return plan


def native_step(layout: str, model: Any, setting: Setting) -> tuple[Callable[[Any], Any], Callable[[], None]]:
    """``layout`` written by hand on its engine: a function that trains one step on a micro-batch and returns the
    loss, and one that frees the engine."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import implicit_replication

    autocast = lambda: torch.autocast(setting.device.type, dtype=torch.bfloat16, enabled=setting.bf16)  # noqa: E731
    if layout.startswith("zero"):
        return _deepspeed_step(int(layout[-1]), model, setting)
    mesh = None
    if layout == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model, device_ids=[setting.device] if setting.gpu else None)
    else:
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor.parallel import parallelize_module

        tp = tp_size(layout, setting.world_size)
        mesh = init_device_mesh(setting.device.type, (setting.world_size // tp, tp), mesh_dim_names=("dp", "tp"))
        if layout.startswith("tp"):
            parallelize_module(model, mesh["tp"], llama_tp_plan(model))
        if layout in ("fsdp2", "tp-fsdp"):
            for block in model.model.layers:
                fully_shard(block, mesh=mesh["dp"])
            # None: torch's default, which keeps the root unit gathered from the forward to the backward pass.
            fully_shard(model, mesh=mesh["dp"], reshard_after_forward=True if setting.reshard_root else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    # TP x DP (replicated): each TP shard's gradient averaged over its data-parallel replicas, one all-reduce each.
    replicas = mesh["dp"].get_group() if layout == "tp-dp" else None

    def step(ids: Any) -> Any:
        with autocast():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if replicas is not None:
            for parameter in model.parameters():
                gradient = parameter.grad.to_local() if hasattr(parameter.grad, "to_local") else parameter.grad
                torch.distributed.all_reduce(gradient, group=replicas)
                gradient /= setting.world_size // tp_size(layout, setting.world_size)
        # TP leaves the norms' weights plain tensors beside the DTensors: a foreach step (CUDA's) needs them replicated.
        with implicit_replication():
            optimizer.step()
        optimizer.zero_grad()
        return loss.detach()

    return step, lambda: None


def _deepspeed_step(stage: int, model: Any, setting: Setting) -> tuple[Callable[[Any], Any], Callable[[], None]]:
    """DeepSpeed's own loop: ``deepspeed.initialize`` with a config written here, ``engine.backward``, ``engine.step``."""
    import deepspeed
    import torch

    from meshplan._compat.deepspeed import forget_zero3_module, remove_engine_forward_hooks

    config = {"train_micro_batch_size_per_gpu": setting.micro_batch, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "gradient_clipping": 0.0}  # DeepSpeed clips at norm 1.0 unless told otherwise; no runner here clips
    if setting.bf16:
        config["bf16"] = {"enabled": True}
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)

    def step(ids: Any) -> Any:
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return loss.detach()

    def free() -> None:
        engine.destroy()
        remove_engine_forward_hooks(engine)
        forget_zero3_module(engine.module)

    return step, free


def run_native(layout: str, setting: Setting, clock: Clock) -> None:
    step, free = native_step(layout, setting.build_model(), setting)
    for ids in setting.rank_batches(layout):
        ids = ids.to(setting.device)
        clock.start()
        loss = step(ids)
        clock.stop(loss)
    free()


# ---------------------------------------------------------------- meshplan through each front end


def run_accelerate(layout: str, setting: Setting, clock: Clock) -> None:
    """``meshplan.accelerator(strategy)`` and the loop of Accelerate's documentation."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import meshplan
    from meshplan._compat.accelerate import release_accelerator

    accelerator = meshplan.accelerator(strategy(layout, setting.world_size), mixed_precision="bf16" if setting.bf16 else "no")
    model = setting.build_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE)
    # Accelerate deals micro-batch i of the loader to data-parallel rank i % dp_size: the rows of global_tokens.
    loader = DataLoader(TensorDataset(setting.global_tokens(layout)), batch_size=setting.micro_batch)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for (ids,) in loader:
        clock.start()
        loss = model(input_ids=ids, labels=ids).loss
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        clock.stop(loss.detach())
    release_accelerator(accelerator)


def run_lightning(layout: str, setting: Setting, clock: Clock) -> None:
    """A LightningModule around the model, ``Trainer(strategy=<meshplan strategy>)``, this rank's batches."""
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from deepspeed import DeepSpeedEngine

    from meshplan._compat.deepspeed import forget_zero3_module, remove_engine_forward_hooks

    class LanguageModel(pl.LightningModule):
        def __init__(self, model: Any):
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, index: int) -> Any:
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=LEARNING_RATE)

    class Timing(pl.Callback):
        def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, index: int) -> None:
            clock.start()

        def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, index: int) -> None:
            clock.stop(outputs["loss"].detach())

    batches = setting.rank_batches(layout)
    module = LanguageModel(setting.build_model())
    trainer = pl.Trainer(
        accelerator="gpu" if setting.gpu else "cpu", devices=setting.world_size, strategy=strategy(layout, setting.world_size),
        precision="bf16-mixed" if setting.bf16 else "32-true", max_steps=len(batches), logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
        callbacks=[Timing()],
    )
    # This rank's micro-batches in order (DeepSpeed's strategy reads the micro-batch size from the loader).
    trainer.fit(module, DataLoader(torch.cat(batches), batch_size=setting.micro_batch))
    engine = trainer.strategy.model
    if isinstance(engine, DeepSpeedEngine):  # its hooks and ZeRO-3's process-wide module list would keep the run alive
        engine.destroy()
        remove_engine_forward_hooks(engine)
        forget_zero3_module(module)


def run_trainer(layout: str, setting: Setting, clock: Clock) -> None:
    """The HF Trainer with ``strategy.training_arguments()``; its own sampler draws the batches."""
    import transformers
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    from meshplan._compat.accelerate import release_accelerator

    class Timing(transformers.TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            clock.stop()

    rows = [{"input_ids": ids, "labels": ids} for ids in setting.global_tokens(layout)]
    arguments = transformers.TrainingArguments(
        output_dir=str(setting.folder / "trainer"), per_device_train_batch_size=setting.micro_batch,
        max_steps=setting.warm_up + setting.steps, learning_rate=LEARNING_RATE, optim="adamw_torch", weight_decay=0.01,
        lr_scheduler_type="constant", max_grad_norm=0.0,  # the other runners do not clip
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, bf16=setting.bf16,
        **strategy(layout, setting.world_size).training_arguments(),
    )
    trainer = transformers.Trainer(model=setting.build_model(), args=arguments, train_dataset=rows, callbacks=[Timing()])
    trainer.remove_callback(transformers.PrinterCallback)  # it prints the run's summary on every rank
    trainer.train()
    unset_hf_deepspeed_config()  # else the next model built in this process would be built under ZeRO-3's Init
    release_accelerator(trainer.accelerator)


RUN = {"native": run_native, "lightning": run_lightning, "accelerate": run_accelerate, "trainer": run_trainer}


def runners_for(layout: str, front_ends: list[str]) -> list[str]:
    """The native engine and the front ends that run ``layout`` here."""
    return ["native", *(front_end for front_end in front_ends if front_end != "trainer" or layout in TRAINER_LAYOUTS)]


def quiet() -> None:
    """Only errors from the libraries: the table is the output (Lightning's hints and tips, transformers' notes)."""
    import logging
    import warnings

    import lightning.pytorch  # noqa: F401  (it sets its loggers' levels as it loads)

    warnings.filterwarnings("ignore")
    for name in ("lightning.pytorch", "lightning.fabric", "transformers", "DeepSpeed", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)


def worker(layouts: list[str], arguments: argparse.Namespace) -> None:
    """One rank: every repeat runs every runner of every layout once; its step times and losses, as JSON per rank."""
    import torch
    import torch.distributed as dist

    setting = Setting(arguments)
    if not setting.gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # what DeepSpeed finds anyway, without its warning
    quiet()
    if setting.gpu:
        torch.cuda.set_device(setting.device)
    dist.init_process_group("nccl" if setting.gpu else "gloo")
    records, environment = [], dict(os.environ)
    for layout in layouts:
        runners = runners_for(layout, arguments.front_ends)
        for repeat in range(arguments.repeats):
            shift = repeat % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                clock = Clock(setting)
                gc.collect()  # the last run's garbage goes now, not in a timed step or the next peak
                if setting.gpu:
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                RUN[runner](layout, setting, clock)
                run_seconds = time.perf_counter() - started  # building the engine and every step
                # Lightning's environment deletes WORLD_SIZE when a Trainer ends; the next runner reads it.
                os.environ.clear()
                os.environ.update(environment)
                records.append({"layout": layout, "runner": runner, "repeat": repeat, "rank": setting.rank,
                                "world_size": setting.world_size, "step_seconds": clock.seconds, "losses": clock.losses, "run_seconds": run_seconds,
                                "peak_memory": torch.cuda.max_memory_allocated() if setting.gpu else None})
    write_rank_records(arguments.output, setting.rank, records)
    dist.destroy_process_group()


# ---------------------------------------------------------------- the summary


def flops_per_token(model: dict[str, int], numel: int, seq_len: int) -> float:
    """Training FLOPs per token: 6 per parameter that multiplies (not the input embedding, a lookup) and the
    attention scores' 12 x layers x hidden x sequence (PaLM's count, as torchtitan's MFU)."""
    multiplying = numel - model["vocab_size"] * model["hidden_size"]
    return 6 * multiplying + 12 * model["num_hidden_layers"] * model["hidden_size"] * seq_len


def summary(records: list[dict[str, Any]], settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Per layout and runner: the median step time over the repeats, tokens/s, peak memory, and (front ends) the
    ratio to the native engine per repeat (median, min, max) and the largest loss difference from the native run."""
    rows = []
    for layout in [layout for layout in LAYOUTS if any(record["layout"] == layout for record in records)]:
        mine = [record for record in records if record["layout"] == layout]
        world_size = mine[0]["world_size"]
        tokens_per_step = settings["micro_batch"] * settings["seq_len"] * world_size // tp_size(layout, world_size)
        steps = {}  # (runner, repeat) -> the time of each timed step (its slowest rank's)
        for runner, repeat in sorted({(record["runner"], record["repeat"]) for record in mine}):
            steps[runner, repeat] = slowest_per_step([r for r in mine if (r["runner"], r["repeat"]) == (runner, repeat)])
        medians = {key: statistics.median(times) for key, times in steps.items()}
        # The fastest step of each runner over every repeat: the machine's interruptions only ever add time.
        fastest = {runner: min(min(times) for (name, _), times in steps.items() if name == runner) for runner, _ in steps}
        for runner in [runner for runner in RUNNERS if (runner, 0) in medians]:
            repeats = sorted(repeat for (name, repeat) in medians if name == runner)
            step = statistics.median(medians[runner, repeat] for repeat in repeats)
            row: dict[str, Any] = {"layout": layout, "runner": runner, "processes": world_size,
                                   "median_step_seconds": step, "tokens_per_second": tokens_per_step / step,
                                   "peak_memory": max((r["peak_memory"] or 0) for r in mine if r["runner"] == runner) or None}
            if settings.get("flops_per_token") and settings.get("peak_flops"):
                row["mfu"] = row["tokens_per_second"] * settings["flops_per_token"] / (settings["peak_flops"] * world_size)
            if runner != "native":
                row["ratio"] = spread([medians[runner, repeat] / medians["native", repeat] for repeat in repeats])
                row["best_ratio"] = fastest[runner] / fastest["native"]
                row["loss_difference"] = _loss_difference(mine, runner)
            rows.append(row)
    return rows


def _loss_difference(records: list[dict[str, Any]], runner: str) -> float | None:
    """The largest difference between a runner's losses and the native run's (same rank, repeat and step)."""
    native = {(r["rank"], r["repeat"]): r["losses"] for r in records if r["runner"] == "native"}
    gaps = [abs(a - b) for r in records if r["runner"] == runner and r["losses"]
            for a, b in zip(r["losses"], native[r["rank"], r["repeat"]])]
    return max(gaps) if gaps else None


def table(rows: list[dict[str, Any]]) -> str:
    """A row per layout and runner: step time, tokens/s, the ratio to native with its spread, the ratio of the
    fastest steps, the loss check."""
    gpu = any(row["peak_memory"] for row in rows)
    header = (f"{'layout':8} {'runner':10} {'N':>2} {'median s':>9} {'tokens/s':>9} {'ratio':>6} {'min':>5} {'max':>5} "
              f"{'best':>5} {'loss diff':>9}")
    lines = [header + (f" {'MFU':>5} {'peak GB':>8}" if gpu else "")]
    for row in rows:
        ratio = row.get("ratio")
        cells = (f"{ratio['median']:6.3f} {ratio['min']:5.2f} {ratio['max']:5.2f} {row['best_ratio']:5.2f}" if ratio
                 else f"{'1':>6} {'':5} {'':5} {'':5}")
        gap = row.get("loss_difference")
        line = (f"{row['layout']:8} {row['runner']:10} {row['processes']:2d} {row['median_step_seconds']:9.3f} "
                f"{row['tokens_per_second']:9.0f} {cells} {('' if gap is None else f'{gap:.1e}'):>9}")
        if gpu:
            line += f" {row.get('mfu', 0):5.1%} {row['peak_memory'] / 2**30:8.1f}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """The ratio of each front end to the native engine, a group of bars per layout, the spread as error bars."""
    pyplot = plots()
    layouts = list(dict.fromkeys(row["layout"] for row in rows))
    figure, axes = pyplot.subplots(figsize=(1.4 * len(layouts) + 2, 4))
    width = 0.8 / len(FRONT_ENDS)
    for index, front_end in enumerate(FRONT_ENDS):
        mine = {row["layout"]: row["ratio"] for row in rows if row["runner"] == front_end}
        places = [position + (index - (len(FRONT_ENDS) - 1) / 2) * width for position, layout in enumerate(layouts) if layout in mine]
        ratios = [mine[layout] for layout in layouts if layout in mine]
        if ratios:
            errors = [[r["median"] - r["min"] for r in ratios], [r["max"] - r["median"] for r in ratios]]
            axes.bar(places, [r["median"] for r in ratios], width, yerr=errors, capsize=3, label=front_end)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.axhline(1.05, color="grey", linestyle="--", linewidth=0.8, label="1.05")
    axes.set_xticks(range(len(layouts)), layouts)
    axes.set_ylabel("step time / native engine's")
    ratios = [row["ratio"] for row in rows if "ratio" in row]
    axes.set_ylim(min(0.8, min(r["min"] for r in ratios) - 0.05), max(1.2, max(r["max"] for r in ratios) + 0.05))
    axes.legend(ncol=4, fontsize="small")
    axes.set_title("meshplan through each front end, against the engine by hand (median of repeats, min-max)")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")


def processes_for(layout: str, gpu: bool) -> int:
    """CPU: 2 processes (4 for TP x FSDP2). GPU: one process per GPU."""
    if gpu:
        import torch

        return torch.cuda.device_count()
    return 4 if layout in ("tp-dp", "tp-fsdp") else 2


def peak_flops(arguments: argparse.Namespace) -> float | None:
    """The GPU's dense bf16 FLOPs per second: --peak-tflops, else by its name."""
    if arguments.peak_tflops:
        return arguments.peak_tflops * 1e12
    import torch

    name = torch.cuda.get_device_name(0)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(DEFAULT_LAYOUTS))
    parser.add_argument("--front-ends", nargs="+", choices=FRONT_ENDS, default=list(FRONT_ENDS))
    parser.add_argument("--repeats", type=int, default=3, help="runs of every runner, interleaved")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warm-up", type=int, default=2, help="untimed steps before them (DeepSpeed's second step is still slow)")
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (64; with --gpu 2048)")
    parser.add_argument("--micro-batch", type=int, help="sequences per data-parallel rank and step (2; with --gpu 4)")
    parser.add_argument("--bf16", action="store_true", help="bf16 mixed precision (always with --gpu)")
    parser.add_argument("--reshard-native-root", action="store_true",
                        help="the native FSDP2 run reshards the root unit after the forward pass, as meshplan does")
    parser.add_argument("--gpu", action="store_true", help="every GPU, nccl, bf16, a Llama of 1.1B parameters")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (default: by its name)")
    parser.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "overhead.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "bench" / "results" / "overhead.png")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    arguments.seq_len = arguments.seq_len or (2048 if arguments.gpu else 64)
    arguments.micro_batch = arguments.micro_batch or (4 if arguments.gpu else 2)
    if arguments.worker:
        worker(arguments.worker.split(","), arguments)
        return 0
    options = ["--front-ends", *arguments.front_ends, "--repeats", str(arguments.repeats), "--steps", str(arguments.steps),
               "--warm-up", str(arguments.warm_up), "--seq-len", str(arguments.seq_len),
               "--micro-batch", str(arguments.micro_batch), *(["--bf16"] if arguments.bf16 else []),
               *(["--gpu"] if arguments.gpu else []), *(["--reshard-native-root"] if arguments.reshard_native_root else [])]
    records = []
    launches: dict[int, list[str]] = {}  # one launch per process count, its layouts in turn
    model = LLAMA_1B if arguments.gpu else LLAMA_20M
    for layout in arguments.layouts:
        processes = processes_for(layout, arguments.gpu)
        if not runs_on(layout, processes):
            print(f"{layout}: needs more than {processes} processes here; left out")
        elif model["num_key_value_heads"] % tp_size(layout, processes):
            print(f"{layout}: TP over {tp_size(layout, processes)} processes would split the model's "
                  f"{model['num_key_value_heads']} key-value heads; left out")
        else:
            launches.setdefault(processes, []).append(layout)
    with tempfile.TemporaryDirectory() as folder:
        for processes, layouts in launches.items():
            records += launch(Path(__file__).resolve(), processes, Path(folder), layouts, *options, cpu=not arguments.gpu)
    settings = {"model": model, "seq_len": arguments.seq_len,
                "micro_batch": arguments.micro_batch, "steps": arguments.steps, "warm_up": arguments.warm_up,
                "repeats": arguments.repeats, "bf16": arguments.bf16 or arguments.gpu, "gpu": arguments.gpu,
                "reshard_native_root": arguments.reshard_native_root}
    if arguments.gpu:
        settings["peak_flops"] = peak_flops(arguments)
        settings["numel"] = _numel(settings["model"])
        settings["flops_per_token"] = flops_per_token(settings["model"], settings["numel"], arguments.seq_len)
    rows = summary(records, settings)
    print(f"Median step time over {arguments.repeats} interleaved repeats of {arguments.steps} steps (after "
          f"{arguments.warm_up}), {arguments.micro_batch} x {arguments.seq_len} tokens per data-parallel rank; "
          f"ratio: a front end with meshplan over the engine by hand (native), its median over the repeats, min and max; "
          f"best: the ratio of the fastest steps")
    print(table(rows))
    write_results(arguments.json, {"settings": settings, "rows": rows, "records": records}, arguments.plot,
                  lambda path: plot(rows, path))
    return 0


def _numel(model: dict[str, int]) -> int:
    """The parameters of the Llama ``model`` describes, counted on the meta device."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return sum(parameter.numel() for parameter in LlamaForCausalLM(LlamaConfig(**model)).parameters())


if __name__ == "__main__":
    sys.exit(main())
