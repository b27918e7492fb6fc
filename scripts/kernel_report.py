"""Static kernel report: compile every attnzoo Triton kernel in every autotune config the launchers
can pick, for sm_90a and sm_80, without a GPU, and tabulate what the compiler made of it.

    python scripts/kernel_report.py                  # full table -> benchmarks/results/static/
    python scripts/kernel_report.py --only flash     # a subset (name filter), printed, nothing written
    python scripts/kernel_report.py --jobs 2         # compile in 2 processes

The full run compiles ~510 kernels (about 40 minutes on 2 busy cores; run it under `nice`). It writes
    benchmarks/results/static/kernels.csv   one row per (kernel, arch, head dim, variant, config)
    benchmarks/results/static/kernels.md    the same as a Markdown table, kept configs first
    benchmarks/results/static/env.json      Triton / ptxas versions the table was made with
    attnzoo/kernels/_fit_table.py           shared bytes and spill bytes per flash config, which the
                                            autotuners' prune (_config.prune_for_device) reads
Columns: registers per thread, spill bytes (stores + loads), stack frame, shared memory (bytes),
whether it fits the architecture's shared-memory limit, whether the autotuner keeps it, the MMA
instructions in the PTX (wgmma / mma.sync, shape, operand type), TMA (cp.async.bulk.tensor), warp
specialisation (setmaxnreg) and cp.async pipelining.

Compiles use tests/cuda_compile.py (Triton's own compiler and bundled ptxas; pointer / stride
specialisation like a real launch on contiguous bf16 tensors). tests/test_kernel_report.py
recompiles a small subset and compares it with the committed table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # compile for real targets: no interpreter (it is set when tests import this)
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

OUT_DIR = ROOT / "benchmarks" / "results" / "static"
FIT_FILE = ROOT / "attnzoo" / "kernels" / "_fit_table.py"
ARCHS = (90, 80)
HEAD_DIMS = (64, 128, 256)
FLASH_VARIANTS = ("dense-causal", "dense", "sparse")  # sparse: 128x128 blocks, causal partial blocks
COLUMNS = ["kernel", "arch", "head_dim", "variant", "block_m", "block_n", "warps", "stages", "regs", "spill",
           "stack", "shared", "fits", "kept", "mma", "tma", "ws", "cp_async", "error"]
SEQ = 4096

FLASH_TENSORS = {
    "fwd": ("_flash_fwd_kernel", ("Q", "K", "V", "O", "LSE")),
    "fwd_tma": ("_flash_fwd_kernel", ("Q", "K", "V", "O", "LSE")),  # with TMA=True
    "dq": ("_flash_dq_kernel", ("Q", "K", "V", "DO", "DQ", "LSE", "DELTA")),
    "dkdv": ("_flash_dkdv_kernel", ("Q", "K", "V", "DO", "DK", "DV_OUT", "LSE", "DELTA")),
}
SPARSE_POINTERS = ("COUNT_FULL", "INDEX_FULL", "COUNT_PART", "INDEX_PART")
PACK_POINTERS = ("TILES", "TILE_BASE", "CU_Q", "CU_K")  # a pack's tile table (unused: the reported kernels run batches)


def launch_ints(arg_names, head_dim: int, seq: int = SEQ) -> dict:
    """Sample integer arguments of a launch on contiguous (B, H, N, D) tensors: unit last-dim strides
    (specialised to 1), row strides D, head / batch strides multiples of 16; the sparse index has
    unit count strides and a list stride that is not a multiple of 16."""
    ints = {}
    for name in arg_names:
        if not name.startswith("stride_"):
            continue
        tail = name[len("stride_"):]
        if tail in ("cb", "ch", "ib", "ih"):
            ints[name] = 33 * 7
        elif tail == "cr":
            ints[name] = 1
        elif tail == "ir":
            ints[name] = 33
        elif tail.endswith("d"):
            ints[name] = 1
        elif tail.endswith("n"):
            ints[name] = head_dim
        else:
            ints[name] = 16 * head_dim * seq
    ints.update(N=seq, M=seq, D=head_dim, DV=head_dim, HQ=16, HK=16, GROUP=1, TUNE_N=seq, TUNE_M=seq, K=head_dim,
                V=head_dim, NT=seq // 64, H=16, n_kb=seq // 128)
    return {k: v for k, v in ints.items() if k in arg_names}


def flash_job(kind: str, arch: int, head_dim: int, variant: str, cfg: tuple, dtype: str = "*bf16") -> dict:
    from attnzoo.kernels import flash
    name, tensors = FLASH_TENSORS[kind]
    fn = getattr(flash, name)
    sparse = variant == "sparse"
    causal = variant in ("dense-causal", "sparse")
    bm, bn, warps, stages = cfg
    pointers = {t: {"LSE": "*fp32", "DELTA": "*fp32"}.get(t, dtype) for t in tensors}
    pointers.update({t: ("*i32" if sparse else None) for t in SPARSE_POINTERS if t in fn.arg_names})
    pointers.update(BIAS=None, DBIAS=None, **dict.fromkeys(PACK_POINTERS))  # the reported variants: no bias, no pack
    constexprs = dict(HAS_LEFT=False, HAS_RIGHT=causal, HAS_SOFTCAP=False, HAS_BIAS=False, BIAS_GRAD=False,
                      VARLEN=False,
                      SPARSE_Q=128 if sparse else 0,
                      SPARSE_K=128 if sparse else 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=head_dim, BLOCK_DV=head_dim,
                      PRECISION="ieee" if dtype == "*fp32" else "tf32", TMA=kind == "fwd_tma")
    constexprs = {k: v for k, v in constexprs.items() if k in fn.arg_names}
    return dict(kernel=f"attnzoo.kernels.flash:{name}", pointers=pointers, floats=["scale", "softcap"],
                constexprs=constexprs, arch=arch, num_warps=warps, num_stages=stages,
                ints=launch_ints(fn.arg_names, head_dim),
                tag=dict(kernel=kind, arch=arch, head_dim=head_dim, variant=variant, block_m=bm, block_n=bn,
                         warps=warps, stages=stages))


LINEAR_ARGS = {
    "_states_fwd": ("k", "v", "g", "h0", "chunk_states", "final_state"),
    "_output_fwd": ("q", "k", "v", "g", "states", "out"),
    "_states_bwd": ("q", "g", "dout", "dfinal", "dstates", "dh0"),
    "_dqk_bwd": ("q", "k", "v", "g", "states", "dstates", "dout", "dq", "dk"),
    "_dv_bwd": ("q", "k", "g", "dstates", "dout", "dv"),
}
LINEAR_SWITCHES = {"_states_fwd": ("HAS_INITIAL", "STORE_CHUNKS"), "_output_fwd": ("CAUSAL",),
                   "_states_bwd": ("HAS_DFINAL", "STORE_CHUNKS"), "_dqk_bwd": ("CAUSAL",), "_dv_bwd": ("CAUSAL",)}


def linear_job(kernel: str, arch: int, head_dim: int, gated: bool, dtype: str = "*bf16") -> dict:
    """The launcher's CUDA tiles (linear._tiles, default chunk sizes of ops.linear), causal."""
    from attnzoo.kernels import linear
    fn = getattr(linear, kernel)
    pointers = dict.fromkeys(("CU", "CHUNK_STARTS", "CHUNKS"))  # no pack
    for name in LINEAR_ARGS[kernel]:
        optional = (name == "g" and not gated) or name in ("h0", "dfinal")
        pointers[name] = None if optional else (dtype if name in ("q", "k", "v", "g", "dout") else "*fp32")
    bt = 16 if gated else 64
    bk, bv = min(head_dim, 32 if gated else 64), min(head_dim, 64)
    flags = {"HAS_INITIAL": False, "HAS_DFINAL": False, "STORE_CHUNKS": True, "CAUSAL": True}
    constexprs = dict(BT=bt, BK=bk, BV=bv, GATED=gated, VARLEN=False,
                      PRECISION="ieee" if dtype == "*fp32" else "native",
                      **{n: flags[n] for n in LINEAR_SWITCHES[kernel]})
    return dict(kernel=f"attnzoo.kernels.linear:{kernel}", pointers=pointers, floats=["scale"], constexprs=constexprs,
                arch=arch, num_warps=4, num_stages=3, ints=launch_ints(fn.arg_names, head_dim),
                tag=dict(kernel=f"linear{kernel}{'_gated' if gated else ''}", arch=arch, head_dim=head_dim,
                         variant="causal", block_m=bt, block_n=bk, warps=4, stages=3))


def scoring_jobs(arch: int, head_dim: int) -> list[dict]:
    from attnzoo.kernels import block_target, scoring
    jobs = []
    fn = block_target._block_target_kernel
    jobs.append(dict(kernel="attnzoo.kernels.block_target:_block_target_kernel",
                     pointers={"Q": "*bf16", "K": "*bf16", "LSE": "*fp32", "OUT": "*fp32",
                               **dict.fromkeys(PACK_POINTERS)},
                     floats=["scale"], constexprs=dict(CAUSAL=True, VARLEN=False, BLOCK=128, BLOCK_M=64, BLOCK_N=64,
                                                       BLOCK_D=head_dim, PRECISION="tf32"),
                     arch=arch, num_warps=4, num_stages=3, ints=launch_ints(fn.arg_names, head_dim),
                     tag=dict(kernel="block_target", arch=arch, head_dim=head_dim, variant="causal", block_m=64,
                              block_n=64, warps=4, stages=3)))
    fn = scoring._antidiagonal_kernel
    stride = 8
    groups = 128 // stride
    jobs.append(dict(kernel="attnzoo.kernels.scoring:_antidiagonal_kernel",
                     pointers={"Q": "*bf16", "K": "*bf16", "OUT": "*fp32", **dict.fromkeys(PACK_POINTERS)},
                     floats=["est_scale_log2"],
                     constexprs=dict(STRIDE=stride, T_CHUNK=scoring.stride_chunk(stride, head_dim), GROUPS_Q=groups,
                                     GROUPS_K=groups, TILE_A=max(16, groups), TILE_B=max(16, groups),
                                     BLOCK_D=head_dim, CAUSAL=True, VARLEN=False, PRECISION="tf32"),
                     arch=arch, num_warps=4, num_stages=3, ints=launch_ints(fn.arg_names, head_dim),
                     tag=dict(kernel="antidiagonal", arch=arch, head_dim=head_dim, variant="causal", block_m=128,
                              block_n=128, warps=4, stages=3)))
    return jobs


def flash_configs(kind: str) -> list[tuple]:
    from attnzoo.kernels import flash
    tuned = flash.TUNED[kind]
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in tuned.configs]


def all_jobs() -> list[dict]:
    from attnzoo.kernels import flash
    jobs = []
    for arch in ARCHS:
        for head_dim in HEAD_DIMS:
            for kind in ("fwd", "dq", "dkdv"):
                for variant in FLASH_VARIANTS:
                    jobs += [flash_job(kind, arch, head_dim, variant, cfg) for cfg in flash_configs(kind)]
            if arch >= 90 and head_dim <= 128 and hasattr(flash, "TMA_CONFIGS"):
                for variant in FLASH_VARIANTS:
                    jobs += [flash_job("fwd_tma", arch, head_dim, variant, cfg) for cfg in flash.TMA_CONFIGS]
            if head_dim <= 128:
                for gated in (True, False):
                    jobs += [linear_job(kernel, arch, head_dim, gated) for kernel in LINEAR_ARGS]
                jobs += scoring_jobs(arch, head_dim)
    return jobs


def _compile_chunk(jobs):
    from cuda_compile import run_jobs
    return [dict(tag, kernel_fn=name, **result) for tag, name, result in run_jobs(jobs, keep_going=True)]


def compile_jobs(jobs, workers: int = 1) -> list[dict]:
    """Compile the jobs (in `workers` processes) and return one row per job."""
    if workers <= 1:
        rows = _compile_chunk(jobs)
    else:
        chunks = [jobs[i::workers] for i in range(workers)]
        with ProcessPoolExecutor(workers) as pool:
            rows = [row for part in pool.map(_compile_chunk, chunks) for row in part]
    return [finish_row(row) for row in rows]


def finish_row(row: dict) -> dict:
    from attnzoo.kernels._config import SHARED_LIMIT, SPILL_BUDGET
    row = dict(row)
    row.setdefault("error", "")
    if not row.get("ok", False):
        row.update(regs="", spill="", stack="", shared="", mma="", tma="", ws="", cp_async="", fits=False)
    else:
        row["fits"] = row["shared"] <= SHARED_LIMIT[row["arch"]]
    row["clean"] = bool(row.get("ok")) and row["fits"] and row["spill"] <= SPILL_BUDGET
    return row


def mark_kept(rows: list[dict]) -> None:
    """The autotuner's verdict for every flash row: what prune_for_device keeps from the table."""
    from attnzoo.kernels._config import prune_table_entry
    groups = {}
    for row in rows:
        if row["kernel"] in FLASH_TENSORS:
            groups.setdefault((row["kernel"], row["arch"], row["head_dim"], row["variant"]), []).append(row)
        else:
            row["kept"] = row["clean"]
    for rs in groups.values():
        entry = {(r["block_m"], r["block_n"], r["warps"], r["stages"]):
                 (r["shared"] if r.get("ok") else 1 << 30, r["spill"] if r.get("ok") else 1 << 30) for r in rs}
        kept = set(prune_table_entry(entry, rs[0]["arch"], limit=None))
        for r in rs:
            r["kept"] = (r["block_m"], r["block_n"], r["warps"], r["stages"]) in kept


def fit_table(rows: list[dict]) -> dict:
    table = {}
    for r in rows:
        if r["kernel"] in FLASH_TENSORS:
            key = (r["kernel"], r["arch"], r["head_dim"], r["variant"])
            table.setdefault(key, {})[(r["block_m"], r["block_n"], r["warps"], r["stages"])] = (
                (r["shared"], r["spill"]) if r.get("ok") else (1 << 30, 1 << 30))
    return table


def write_fit_table(rows: list[dict], path: Path = FIT_FILE) -> None:
    lines = ['"""Generated by scripts/kernel_report.py from the static compile of every flash autotune config',
             "(bf16, contiguous): (kernel, arch, head dim, variant) -> {(BLOCK_M, BLOCK_N, warps, stages):",
             '(shared bytes, spill bytes)}. Read by _config.prune_for_device; do not edit by hand."""', "",
             "FIT = {"]
    for key, entry in sorted(fit_table(rows).items()):
        lines.append(f"    {key!r}: {{")
        for cfg, val in sorted(entry.items()):
            lines.append(f"        {cfg!r}: {val!r},")
        lines.append("    },")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


def sort_key(r):
    return (str(r["kernel"]), -r["arch"], r["head_dim"], r["variant"], not r["kept"], -r["block_m"], -r["block_n"],
            -r["warps"], -r["stages"])


def write_tables(rows: list[dict], out_dir: Path = OUT_DIR) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = sorted(rows, key=sort_key)
    with open(out_dir / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    md = ["# Static kernel report (generated by scripts/kernel_report.py; no GPU involved)", "",
          "bf16 inputs, contiguous tensors, N = M = 4096 specialisation; sparse = 128x128 block index, causal.",
          "`kept`: the autotuner keeps the config on that architecture (fits shared memory, spills <= budget).",
          "Compiler output only: registers, spills and shared memory, never a timing.", ""]
    md += headline(rows)
    md += ["", "## Every kernel and config", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        md.append("| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |")
    (out_dir / "kernels.md").write_text("\n".join(md) + "\n")
    (out_dir / "env.json").write_text(json.dumps(environment(), indent=2) + "\n")


HEADLINE_COLUMNS = ["kernel", "head_dim", "variant", "block_m", "block_n", "warps", "stages", "regs", "spill", "shared",
                    "mma", "tma"]


def headline(rows: list[dict]) -> list[str]:
    """Markdown: the configs the autotuner keeps on sm_90 for dense fwd / TMA fwd / dq / dkdv at
    D64 / D128, then every linear kernel on sm_90, and how many configs are pruned per architecture."""
    pick = [r for r in rows if r["arch"] == 90 and r["head_dim"] in (64, 128) and r["kept"] and (
        (r["kernel"] in ("fwd", "fwd_tma", "dq", "dkdv") and r["variant"] in ("dense-causal", "dense"))
        or str(r["kernel"]).startswith("linear"))]
    out = ["## Headline: what the autotuner keeps on sm_90 (dense flash D64 / D128; linear kernels)", "",
           "| " + " | ".join(HEADLINE_COLUMNS) + " |", "|" + "---|" * len(HEADLINE_COLUMNS)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in HEADLINE_COLUMNS) + " |" for r in pick]
    flash_rows = [r for r in rows if r["kernel"] in FLASH_TENSORS]
    out += ["", "Flash configs pruned (of all candidates x head dims x variants): " + ", ".join(
        f"sm_{arch}: {sum(not r['kept'] for r in flash_rows if r['arch'] == arch)} of "
        f"{sum(r['arch'] == arch for r in flash_rows)} "
        f"({sum(not r['fits'] for r in flash_rows if r['arch'] == arch)} over the shared-memory limit)"
        for arch in ARCHS)]
    return out


def environment() -> dict:
    import triton
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = {}
    for arch in ARCHS:
        tool = get_ptxas(arch)
        out = subprocess.run([tool.path, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        ptxas[f"sm_{arch}"] = f"{os.path.basename(tool.path)}: {out[-1] if out else '?'}"
    return dict(triton=triton.__version__, ptxas=ptxas, python=sys.version.split()[0],
                regenerate="nice -n 19 python scripts/kernel_report.py --jobs 2")


def read_table(path: Path = OUT_DIR / "kernels.csv") -> list[dict]:
    with open(path) as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for c in ("arch", "head_dim", "block_m", "block_n", "warps", "stages", "regs", "spill", "stack", "shared"):
            r[c] = int(r[c]) if r[c] not in ("", None) else None
        for c in ("fits", "kept", "tma", "ws", "cp_async"):
            r[c] = r[c] == "True"
        r["ok"] = not r["error"]
    return rows


def row_key(r) -> tuple:
    return tuple(r[c] for c in ("kernel", "arch", "head_dim", "variant", "block_m", "block_n", "warps", "stages"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="compile only jobs whose kernel name contains this; print only")
    parser.add_argument("--jobs", type=int, default=1, help="compile processes")
    parser.add_argument("--merge", action="store_true",
                        help="with --only: recompile those jobs and replace their rows in the committed table")
    args = parser.parse_args(argv)
    jobs = all_jobs()
    if args.only:
        jobs = [j for j in jobs if args.only in j["tag"]["kernel"] or args.only in j["kernel"]]
    rows = compile_jobs(jobs, args.jobs)
    mark_kept(rows)
    if args.only and args.merge:
        from attnzoo.kernels._config import SPILL_BUDGET
        fresh = {row_key(r) for r in rows}
        rows = [r for r in read_table() if row_key(r) not in fresh] + rows
        for r in rows:
            r.setdefault("clean", r["ok"] and r["fits"] and r["spill"] <= SPILL_BUDGET)
        mark_kept(rows)
    elif args.only:
        for r in sorted(rows, key=sort_key):
            print(",".join(str(r.get(c, "")) for c in COLUMNS))
        return 0
    write_tables(rows)
    write_fit_table(rows)
    print(f"{len(rows)} kernels -> {OUT_DIR}; fit table -> {FIT_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
