"""One worker of `meshplan finetune`: python -m meshplan.finetune.worker JOB.json"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from meshplan.finetune.frontends import FRONTENDS
from meshplan.finetune.job import FinetuneJob, Prepared


def main(job_path: str) -> int:
    """Trains the job on this rank; rank 0 writes metrics.json next to the saved model."""
    job = FinetuneJob.from_json(job_path)
    metrics = FRONTENDS[job.framework](job, Prepared(job))
    if int(os.environ.get("RANK", "0")) == 0:
        (Path(job.output) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
