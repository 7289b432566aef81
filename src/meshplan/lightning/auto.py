"""meshplan.lightning.Auto (``strategy="meshplan_auto"``): the layout chosen once the model is known.

Lightning builds the strategy in ``Trainer(...)``, before it has seen the model, and derives the
launcher, precision plugin and devices from it there. Auto is therefore a plain DDP strategy
until the Trainer runs: it launches the processes as every meshplan layout does (one per device,
the same launcher), and in ``setup_environment``, the first step after the LightningModule is
connected, it

1. starts the process group (DDP's, on the device's default backend: gloo on CPU, nccl on CUDA);
2. measures the memory per process (``meshplan.planner.memory_per_process``) and takes the
   smallest over all processes, so that every process plans from the same figures and chooses
   the same layout (a node with less memory bounds the layout);
3. asks the planner for the layout, and logs ``meshplan: chose ...`` on rank 0;
4. builds the chosen meshplan strategy (``from_plan``), hands it what the Trainer's connector had
   set on Auto (accelerator, precision plugin, cluster environment, devices, launcher), puts it
   in the Trainer and lets it set the environment up: from there on ``trainer.strategy`` is
   that strategy (``meshplan.DDP``, ``meshplan.ZeRO`` or ``meshplan.TensorParallel``), exactly
   as if it had been passed to the Trainer.

The choice is made once per Trainer: later ``fit``, ``validate`` or ``test`` calls on it run the
chosen strategy. The model must exist when the Trainer runs (built in ``__init__``, not in
``configure_model``), since it is what the planner sizes.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from lightning.pytorch.plugins.precision import DeepSpeedPrecision, Precision
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy
from lightning.pytorch.utilities.parsing import lightning_getattr, lightning_hasattr
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.utils.data import DataLoader
from typing_extensions import override

from meshplan._compat.lightning import given_train_loader, hand_over_launch, replace_trainer_strategy
from meshplan.auto import announcement, choose_layout, without_layouts
from meshplan.plan import normalize_precision
from meshplan.planner.types import LayoutChoice


# The precisions Lightning's connector lets ModelParallelStrategy (meshplan's TP and FSDP2) run with.
TENSOR_PARALLEL_PRECISIONS = ("32-true", "bf16-mixed", "bf16-true", "16-true")


class Auto(DDPStrategy):
    """Chooses ddp, ZeRO 1/2/3 (DeepSpeed or FSDP2), ZeRO-3 offload, TP or TP x FSDP2 from the model, the world
    size and the memory per process.

    Args:
        micro_batch_size: samples per process per step to plan for. None: the ``batch_size`` of the
            DataLoader passed to ``fit``, else the ``batch_size`` attribute Lightning's batch-size
            finder reads (on the module, its hparams or the datamodule), else 1.
        seq_len: tokens per sample to plan for. None: 2048, or the model's
            ``max_position_embeddings`` when that is lower.
        precision: the precision to plan for ("bf16-mixed", "bf16", "32-true", "no", ...). None: the Trainer's.
        gradient_checkpointing: plan with activation checkpointing. None: whether the transformers
            model inside the module has it on when the Trainer runs.
        device_memory: bytes (or a string such as "80GB") one process may use. None: the smallest
            over the processes of ``memory_per_process``: a CUDA device's total memory, or on CPU
            the host memory divided among the node's processes.

    After the choice, ``trainer.strategy`` is the chosen meshplan strategy; the planner's
    ``LayoutChoice`` (the reason, and every candidate it weighed) is ``choice`` here and
    ``trainer.strategy.layout_choice`` there.

    Raises:
        PlanError: when the Trainer runs, if no layout fits; the message names the smallest
            memory or device count that would.

    Example::

        trainer = lightning.Trainer(accelerator="cpu", devices=2, strategy="meshplan_auto")
        trainer = lightning.Trainer(devices=8, strategy=meshplan.lightning.Auto(seq_len=4096))
    """

    def __init__(self, micro_batch_size: int | None = None, seq_len: int | None = None, precision: str | None = None,
                 gradient_checkpointing: bool | None = None, device_memory: int | str | None = None) -> None:
        super().__init__()
        self.micro_batch_size = micro_batch_size
        self.seq_len = seq_len
        self.planned_precision = precision  # not `precision`: Fabric's strategies use that name for their plugin
        self.gradient_checkpointing = gradient_checkpointing
        self.device_memory = device_memory
        self.choice: LayoutChoice | None = None  # the planner's, once made

    @override
    def setup_environment(self) -> None:
        # DDP's: the device and the process group, which the chosen strategy then finds started.
        super().setup_environment()
        trainer = self.lightning_module.trainer
        self.choice = self.choose(trainer)
        rank_zero_info(announcement(self.choice))
        chosen = self.build_chosen(trainer)
        chosen.setup_environment()

    def choose(self, trainer: Any) -> LayoutChoice:
        """The planner's choice for the connected module on this Trainer's processes.

        With a process group, every process contributes its memory and batch size and all
        plan from the smallest memory and the largest batch: the same figures, the same layout.
        """
        memory, batch = self._agreed(self.device_memory, self._micro_batch_size(trainer))
        choice = choose_layout(
            self.lightning_module, processes_per_node=self.num_processes, nodes=self.num_nodes, device=self.root_device,
            device_memory=memory, micro_batch_size=batch, seq_len=self.seq_len,
            precision=normalize_precision(self.planned_precision or trainer.precision) or "no",
            gradient_checkpointing=self.gradient_checkpointing,
        )
        if str(trainer.precision) not in TENSOR_PARALLEL_PRECISIONS:
            choice = without_layouts(
                choice, lambda plan: plan.strategy == "tp" or plan.uses_fsdp2, "tensor parallelism or FSDP2",
                f"Lightning's ModelParallelStrategy, which they run on, does not take precision={trainer.precision!r}")
        return choice

    def build_chosen(self, trainer: Any) -> Strategy:
        """The strategy of ``self.choice``, set up as the Trainer's connector would have, and now the Trainer's."""
        from meshplan.lightning import from_plan

        chosen = from_plan(self.choice.plan)
        chosen.accelerator = self.accelerator
        chosen.precision_plugin = _precision_for(chosen, self.precision_plugin)
        chosen.checkpoint_io = self.checkpoint_io
        chosen.cluster_environment = self.cluster_environment
        chosen.parallel_devices = self.parallel_devices
        chosen.num_nodes = self.num_nodes
        chosen.set_world_ranks()
        hand_over_launch(self, chosen)
        chosen.layout_choice = self.choice
        replace_trainer_strategy(trainer, chosen)
        chosen.connect(self.lightning_module)
        return chosen

    def _micro_batch_size(self, trainer: Any) -> int:
        """Auto's argument, the batch size of the DataLoader given to ``fit``, the module's ``batch_size``, or 1."""
        if self.micro_batch_size is not None:
            return self.micro_batch_size
        loader = given_train_loader(trainer)
        size = _loader_batch_size(loader) if isinstance(loader, DataLoader) else None
        if size is None and lightning_hasattr(self.lightning_module, "batch_size"):
            size = lightning_getattr(self.lightning_module, "batch_size")
        return size if isinstance(size, int) and size > 0 else 1

    def _agreed(self, device_memory: int | str | None, batch: int) -> tuple[int | str, int]:
        """The memory to plan for (given, or the smallest measured) and the largest batch, over every process."""
        from meshplan.planner import memory_per_process

        memory = device_memory if device_memory is not None else memory_per_process(self.num_processes, self.root_device)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return memory, batch
        everyone: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, (memory, batch))
        memories = [entry[0] for entry in everyone]
        # A given device_memory is the same on every process; measured bytes may differ between nodes.
        agreed = memory if device_memory is not None else min(memories)
        return agreed, max(entry[1] for entry in everyone)


def _loader_batch_size(loader: DataLoader) -> int | None:
    """A DataLoader's samples per batch: its ``batch_size``, or its batch sampler's."""
    if loader.batch_size is not None:
        return loader.batch_size
    return getattr(loader.batch_sampler, "batch_size", None)


def _precision_for(strategy: Strategy, plugin: Precision) -> Precision:
    """The Trainer's precision plugin, as Lightning's connector would have made it for ``strategy``.

    The connector gives DeepSpeed strategies a DeepSpeedPrecision of the Trainer's precision and
    every other strategy the generic plugin it gave Auto.
    """
    if isinstance(strategy, DeepSpeedStrategy) and not isinstance(plugin, DeepSpeedPrecision):
        return DeepSpeedPrecision(plugin.precision)
    return plugin
