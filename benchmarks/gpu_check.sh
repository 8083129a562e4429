#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a lent GPU machine: one GPU, the machine's own python3
# with torch and transformers; nothing else is needed there (no Ray, vLLM or DeepSpeed).
#   bash benchmarks/gpu_check.sh     # the report: $OUT/gpu_check.md, or ./gpu_check.md without $OUT
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python3 -c "import torch, transformers; assert torch.cuda.is_available(), 'no GPU'" ||
    { echo "gpu_check.sh: needs a CUDA GPU and python3 with torch and transformers" >&2; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONUNBUFFERED=1 exec python3 benchmarks/gpu_check.py --out "${OUT:-.}" "$@"
