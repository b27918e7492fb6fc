#!/usr/bin/env bash
# The full GPU benchmark in one command (needs a CUDA GPU; long: 56 cases x every method and
# baseline x 2 modes, not yet timed on a GPU, so try CONFIG=...gpu_smoke.yaml first):
#
#     bash benchmarks/run_gpu_sweep.sh                 # writes benchmarks/results/<device>/
#     bash benchmarks/run_gpu_sweep.sh --methods dense,xattention --seqlens 4096,16384
#
# Extra arguments are passed to `attnzoo bench` and override benchmarks/configs/gpu_full.yaml.
# Set CONFIG=benchmarks/configs/gpu_smoke.yaml for a few-minute check first.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # time the compiled kernels, never the interpreter

config="${CONFIG:-benchmarks/configs/gpu_full.yaml}"
device=$(python - <<'PY'
import re, sys, torch
if not torch.cuda.is_available():
    sys.exit("run_gpu_sweep.sh: no CUDA device; for a CPU check run: attnzoo bench --quick")
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))
PY
)
out="benchmarks/results/${device}"
mkdir -p "${out}"
echo "sweep ${config} on ${device} -> ${out}"
python -m attnzoo.bench --config "${config}" --device cuda --out "${out}" "$@" 2>&1 | tee "${out}/bench.log"
