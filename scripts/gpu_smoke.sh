#!/usr/bin/env bash
# GPU smoke test: the parity checks on CUDA with nccl, on every GPU of this machine.
# Usage (from the repository root, on a machine with NVIDIA GPUs): bash scripts/gpu_smoke.sh
# nccl needs one GPU per process: on a single GPU only the one-process cases run (FSDP2 among
# them, scripts/fsdp2_gpu.py), so the 2- and 4-process layouts (DDP, ZeRO, TP, TP x DP, TP x FSDP2)
# need a machine with 2 and 4 GPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ "$gpus" -lt 1 ]; then
    echo "gpu_smoke: no CUDA device visible; nothing to check" >&2
    exit 2
fi
python3 -c "import torch, torch.distributed as d; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0), 'nccl', d.is_nccl_available())"
MESHPLAN_TEST_ACCELERATOR=gpu PYTHONUNBUFFERED=1 python3 tests/scripts/parity_report.py --max-processes "$gpus"
# Checkpoints: exact resume per strategy and resume under another layout (needs 4 GPUs for TP x DP).
if [ "$gpus" -ge 4 ]; then
    MESHPLAN_TEST_ACCELERATOR=gpu PYTHONUNBUFFERED=1 python3 tests/scripts/checkpoint_report.py
fi
# ZeRO-3 on FSDP2 in one process (nccl, world size 1): a small Llama in fp32 and bf16 against a plain run.
PYTHONUNBUFFERED=1 python3 scripts/fsdp2_gpu.py
# The planner: its estimate beside CUDA's memory counters for a ~1B Llama in one process.
PYTHONUNBUFFERED=1 python3 scripts/planner_gpu.py
# Benchmarks: each layout through Lightning, Accelerate and the HF Trainer against the engine driven by
# hand, bf16, a 1.1B Llama, every GPU: tokens/s, MFU and peak memory (docs/benchmarks.md).
PYTHONUNBUFFERED=1 python3 bench/overhead.py --gpu --repeats 2
