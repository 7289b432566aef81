"""A Lightning script for a Slurm job: one process per srun task, the parity model under a meshplan strategy.

    MESHPLAN_RECIPE=zero2 srun --ntasks-per-node=2 python tests/scripts/slurm_lightning_train.py OUT_DIR REFERENCE.pt \\
        --devices 2 [--nodes 1]

The strategy is meshplan.from_recipe(os.environ["MESHPLAN_RECIPE"]), as the script printed by
``meshplan slurm --lightning`` tells a user to write it (that script exports the variable).
Nothing here mentions Slurm: Lightning must detect it. Every rank writes OUT_DIR/rank<SLURM_PROCID>.json: the cluster environment Lightning chose, its
ranks next to Slurm's, the global loss per step and the worst weight error against the reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import meshplan  # noqa: E402
from helpers import parity  # noqa: E402

MODEL = "llama"


def main(output_dir: Path, reference_path: str, devices: int, nodes: int) -> None:
    """Trains parity.STEPS steps on ``nodes x devices`` processes and writes this rank's record."""
    # Read before fit: Slurm's view of this process, and the layout the job was given.
    slurm = {name: int(os.environ[f"SLURM_{name.upper()}"]) for name in ("procid", "localid", "nodeid", "ntasks")}
    strategy = meshplan.from_recipe(os.environ["MESHPLAN_RECIPE"])
    module = parity.ParityModule(MODEL, parity.GLOBAL_BATCH // (devices * nodes))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, num_nodes=nodes, strategy=strategy, max_steps=parity.STEPS,
        use_distributed_sampler=False, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module)
    losses = torch.tensor(module.losses, dtype=torch.float64)
    dist.all_reduce(losses)
    losses /= dist.get_world_size()
    weights = parity.full_parameters(module.model)
    _, reference = torch.load(reference_path, weights_only=True)
    record = {
        "cluster_environment": type(trainer.strategy.cluster_environment).__name__,
        "strategy": type(trainer.strategy).__name__,
        "global_rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
        "world_size": trainer.world_size, "slurm": slurm,
        "losses": losses.tolist(), "steps": len(module.losses),
        "weight_error": max((weights[key].cpu() - reference[key]).abs().max().item() for key in reference),
    }
    (output_dir / f"rank{slurm['procid']}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("reference")
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--nodes", type=int, default=1)
    arguments = parser.parse_args()
    main(arguments.output_dir, arguments.reference, arguments.devices, arguments.nodes)
