#!/usr/bin/env bash
# The first run on a real GPU, in one command, under 8 minutes on one H100/H200 including compiles:
#
#     bash benchmarks/run_gpu_sweep.sh          # writes benchmarks/results/<device>/
#
# 1. `pytest -m gpu` (the CUDA correctness tests, compiled kernels);
# 2. `attnzoo bench` with benchmarks/configs/gpu_first_run.yaml: forward / forward+backward TFLOP/s of
#    the dense kernel vs SDPA-flash (and flash-attn if importable) at N = 4k/8k/16k, D = 64/128, causal
#    and not, plus block_sparse (density 0.5) -> bench.csv, bench.json;
# 3. block_sparse at densities 0.1 / 0.25 / 0.5 vs dense (triton.testing.do_bench) -> block_sparse_density.csv;
# 4. packed sequences vs padding and vs a loop over sequences (benchmarks/varlen.py) -> varlen.csv;
# plus env.txt (GPU, driver, versions) and the logs. Each step has its own time limit (STEP1_S,
# STEP2_S, STEP3_S, STEP4_S seconds) so that the whole run stays under 8 minutes; a step that runs out is
# reported in the log and the next one starts. Extra arguments go to `attnzoo bench`.
# CONFIG=benchmarks/configs/gpu_full.yaml (with larger STEP2_S) runs the long sweep instead.
set -uo pipefail
cd "$(dirname "$0")/.."
export TRITON_INTERPRET=0  # compiled kernels, never the interpreter (tests/conftest.py defaults it to 1)
export TRITON_DEFAULT_FP_FUSION=1
start=$(date +%s)

config="${CONFIG:-benchmarks/configs/gpu_first_run.yaml}"
device=$(python - <<'PY'
import re, sys, torch
if not torch.cuda.is_available():
    sys.exit("run_gpu_sweep.sh: no CUDA device; for a CPU check run: attnzoo bench --quick")
print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-"))
PY
) || exit 1
out="benchmarks/results/${device}"
mkdir -p "${out}"
echo "run_gpu_sweep: ${config} on ${device} -> ${out}"

{
  date -u +"date %Y-%m-%dT%H:%M:%SZ"
  git rev-parse HEAD 2>/dev/null | sed 's/^/commit /'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null
  python - <<'PY'
import platform, torch, triton
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
p = torch.cuda.get_device_properties(0)
print("capability", f"{p.major}.{p.minor}", "sms", p.multi_processor_count,
      "smem_per_block_optin", getattr(p, "shared_memory_per_block_optin", "?"))
try:
    import flash_attn
    print("flash_attn", flash_attn.__version__)
except ImportError:
    print("flash_attn not installed")
PY
} > "${out}/env.txt" 2>&1
cat "${out}/env.txt"

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log, report status and elapsed time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout --signal=INT --kill-after=20 "${limit}" "$@" 2>&1 | tee "${out}/${name}.log"
  local rc=${PIPESTATUS[0]}
  echo "run_gpu_sweep: ${name} rc=${rc} ($(( $(date +%s) - t0 )) s; limit ${limit} s)" | tee -a "${out}/steps.txt"
}

step pytest_gpu "${STEP1_S:-150}" python -m pytest -q -p no:cacheprovider -m gpu tests

baselines=sdpa_flash
python -c "import flash_attn" 2>/dev/null && baselines=sdpa_flash,flash_attn
step bench "${STEP2_S:-210}" python -m attnzoo.bench --config "${config}" --device cuda --baselines "${baselines}" \
  --out "${out}" "$@"

step block_sparse_density "${STEP3_S:-90}" python - "${out}/block_sparse_density.csv" <<'PY'
"""block_sparse at densities 0.1/0.25/0.5 vs dense, bf16, B=1, H=16, D=128, N = 8k/16k, causal and not."""
import csv, sys
import torch, triton
import attnzoo
from attnzoo import masks

rows = []
dense, sparse = attnzoo.get("dense"), attnzoo.get("block_sparse")

def first(r):
    return r[0] if isinstance(r, (tuple, list)) else r

def bench(fn, q, k, v, grad):
    if not grad:
        return triton.testing.do_bench(lambda: fn(q, k, v), warmup=25, rep=50)
    do = torch.randn_like(q)
    def step():
        q.grad = k.grad = v.grad = None
        first(fn(q, k, v)).backward(do)
    return triton.testing.do_bench(step, warmup=25, rep=50)

for n in (8192, 16384):
    for causal in (True, False):
        q, k, v = (torch.randn(1, 16, n, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        flops = 4 * 16 * n * n * 128 / (2 if causal else 1)
        for grad in (False, True):
            mode = "fwd+bwd" if grad else "fwd"
            scale = 3.5 if grad else 1.0
            ms_dense = bench(lambda a, b, c: dense(a, b, c, causal=causal), q, k, v, grad)
            rows.append(dict(method="dense", n=n, causal=causal, mode=mode, density=1.0, ms=ms_dense,
                             tflops=flops * scale / ms_dense / 1e9, speedup=1.0))
            for density in (0.1, 0.25, 0.5):
                mask = masks.random(n, n, density, 128, causal=causal, device="cuda")
                ms = bench(lambda a, b, c: sparse(a, b, c, causal=causal, block_mask=mask), q, k, v, grad)
                rows.append(dict(method="block_sparse", n=n, causal=causal, mode=mode, density=density, ms=ms,
                                 tflops=flops * scale / ms / 1e9, speedup=ms_dense / ms))
            for r in rows[-4:]:
                print(r, flush=True)
        with open(sys.argv[1], "w", newline="") as f:  # rewritten after every case: a timeout keeps what ran
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
PY

# 4. packed sequences (one launch per pass) vs padding vs one call per sequence -> varlen.csv, varlen.json
step varlen "${STEP4_S:-90}" python benchmarks/varlen.py --device cuda --dtype bfloat16 --reps 5 --out "${out}"

echo "run_gpu_sweep: done in $(( $(date +%s) - start )) s -> ${out}" | tee -a "${out}/steps.txt"
