"""One worker of a two-node launch in tests/test_multinode.py: every layout of one front end, in turn.

    torchrun --nnodes 2 --nproc_per_node 2 ... tests/scripts/multinode_train.py lightning OUT.json REFERENCE.pt
    torchrun --nnodes 2 --nproc_per_node 2 ... tests/scripts/multinode_train.py trainer OUT.json REFERENCE.pt
    accelerate launch --num_machines 2 ... tests/scripts/multinode_train.py accelerate OUT.json REFERENCE.pt

The training lives in tests/helpers/multinode_workers.py. Global rank 0 writes OUT.json:
``{"results": {layout: {...}}, "placement": [one record per rank]}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the helpers package

from helpers import multinode_workers  # noqa: E402


def main(front_end: str, output: Path, reference: str) -> None:
    """Runs the front end's layouts, then writes what rank 0 measured and where every rank ran."""
    launched = dict(os.environ)  # read first: Lightning's teardown removes some of these variables
    if front_end == "lightning":
        results = multinode_workers.lightning_layouts(reference)
    elif front_end == "accelerate":
        results = multinode_workers.accelerate_layouts(reference)
    else:
        results = multinode_workers.trainer_layouts(reference, str(output.parent / "trainer-runs"))
    placement = multinode_workers.placement(launched, results)
    if dist.get_rank() == 0:
        output.write_text(json.dumps({"results": results, "placement": placement}))
    dist.barrier()
    dist.destroy_process_group()  # while the interpreter is whole (see meshplan.accelerate._tear_down_process_group)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("front_end", choices=("lightning", "accelerate", "trainer"))
    parser.add_argument("output", type=Path)
    parser.add_argument("reference")
    arguments = parser.parse_args()
    main(arguments.front_end, arguments.output, arguments.reference)
