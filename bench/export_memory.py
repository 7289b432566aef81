"""Peak memory of `meshplan export` against the size of the model it exports.

    python bench/export_memory.py [--hidden 2048] [--layers 8]

Writes a meshplan checkpoint of a Llama of the given size (one process, model and AdamW state)
in a child process, then exports it in a fresh child process and prints that process's peak
resident memory, its baseline (after imports, before export) and the model's size.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

WRITE = """
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from meshplan.checkpoint import save_training_state
hidden, layers = int(sys.argv[2]), int(sys.argv[3])
config = LlamaConfig(hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers, num_attention_heads=16,
                     num_key_value_heads=16, vocab_size=32000)
model = LlamaForCausalLM(config)
optimizer = torch.optim.AdamW(model.parameters())
model(input_ids=torch.ones(1, 4, dtype=torch.long), labels=torch.ones(1, 4, dtype=torch.long)).loss.backward()
optimizer.step()
save_training_state(sys.argv[1], {"model": model}, {"optimizer": optimizer}, {"step": 1})
print(sum(p.numel() * p.element_size() for p in model.parameters()))
"""

EXPORT = """
import resource, sys, time
import meshplan
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
meshplan.export(sys.argv[1], sys.argv[2])
print(baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.monotonic() - start)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, out = Path(folder) / "checkpoint", Path(folder) / "model"
        written = subprocess.run([sys.executable, "-c", WRITE, str(checkpoint), str(args.hidden), str(args.layers)],
                                 capture_output=True, text=True, check=True)
        model_bytes = int(written.stdout.split()[-1])
        exported = subprocess.run([sys.executable, "-c", EXPORT, str(checkpoint), str(out)], capture_output=True, text=True,
                                  check=True)
        baseline_kib, peak_kib, seconds = exported.stdout.split()[-3:]
        largest = max(p.stat().st_size for p in out.glob("*.safetensors"))
    mib = 2**20
    growth = (int(peak_kib) - int(baseline_kib)) * 1024
    print(f"model: {model_bytes / mib:.0f} MiB of weights (hidden {args.hidden}, {args.layers} layers); "
          f"checkpoint also holds AdamW state (3x)")
    print(f"export: peak RSS {int(peak_kib) / 1024:.0f} MiB, of which {int(baseline_kib) / 1024:.0f} MiB after imports; "
          f"growth during export {growth / mib:.0f} MiB = {growth / model_bytes:.2f}x the model; {float(seconds):.1f} s")
    print(f"output: {largest / mib:.0f} MiB in the largest file")


if __name__ == "__main__":
    main()
