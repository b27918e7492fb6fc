"""The static kernel report (scripts/kernel_report.py -> benchmarks/results/static/) and the per-device
autotune pruning that reads it.

The committed table is checked as it stands (every config the autotuner keeps fits the device; the
dense flash configs kept on sm_90 at D64/D128 do not spill; the generated fit table and the candidate
lists agree with it), and a small representative subset is recompiled (one child process, no GPU)
and compared with it: a config that newly spills, grows its shared memory beyond the device limit or
leaves the tensor cores fails. Regenerate the table after changing a kernel or a config list:
`nice -n 19 python scripts/kernel_report.py --jobs 2` (docs/gpu.md)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import triton

from attnzoo.kernels import flash
from attnzoo.kernels._config import SHARED_LIMIT, SPILL_BUDGET, prune_for_device, prune_table_entry
from attnzoo.kernels._fit_table import FIT

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import kernel_report  # noqa: E402

TABLE = kernel_report.read_table()
FLASH = [r for r in TABLE if r["kernel"] in ("fwd", "dq", "dkdv", "fwd_tma")]


def _rows(**where):
    return [r for r in TABLE if all(r[k] == v for k, v in where.items())]


def test_table_has_every_kernel_arch_and_head_dim():
    kinds = {r["kernel"] for r in TABLE}
    assert {"fwd", "dq", "dkdv", "block_target", "antidiagonal"} <= kinds
    assert any(k.startswith("linear_") for k in kinds)
    for kind in ("fwd", "dq", "dkdv"):
        for arch in (90, 80):
            for head_dim in (64, 128, 256):
                for variant in kernel_report.FLASH_VARIANTS:
                    rows = _rows(kernel=kind, arch=arch, head_dim=head_dim, variant=variant)
                    assert len(rows) == len(kernel_report.flash_configs(kind)), (kind, arch, head_dim, variant)
                    assert all(r["ok"] for r in rows), [r["error"] for r in rows if not r["ok"]]


def test_every_kept_config_fits_its_device_and_every_group_keeps_one():
    groups = {}
    for r in FLASH:
        groups.setdefault((r["kernel"], r["arch"], r["head_dim"], r["variant"]), []).append(r)
        if r["kept"]:
            assert r["shared"] <= SHARED_LIMIT[r["arch"]], r
    for key, rows in groups.items():
        assert any(r["kept"] for r in rows), key


def test_dense_flash_configs_kept_on_sm90_do_not_spill_at_d64_and_d128():
    for kind in ("fwd", "dq", "dkdv"):
        for head_dim in (64, 128):
            for variant in ("dense-causal", "dense"):
                kept = _rows(kernel=kind, arch=90, head_dim=head_dim, variant=variant, kept=True)
                assert kept and all(r["spill"] <= SPILL_BUDGET for r in kept), (kind, head_dim, variant)
                assert all("wgmma" in r["mma"] or "mma.sync" in r["mma"] for r in kept)
                assert any("wgmma" in r["mma"] for r in kept), (kind, head_dim, variant)


def test_dkdv_d128_has_a_spill_free_config_on_sm90_and_sm80():
    for arch in (90, 80):
        for variant in ("dense-causal", "dense"):
            assert any(r["spill"] == 0 and r["fits"] for r in _rows(kernel="dkdv", arch=arch, head_dim=128,
                                                                      variant=variant)), (arch, variant)


def test_fit_table_and_config_lists_agree_with_the_committed_table():
    assert FIT == kernel_report.fit_table(FLASH), "regenerate: python scripts/kernel_report.py"
    for kind in ("fwd", "dq", "dkdv"):
        listed = set(kernel_report.flash_configs(kind))
        assert listed == {(r["block_m"], r["block_n"], r["warps"], r["stages"]) for r in _rows(kernel=kind)}, kind


def _configs(kind):
    return flash.TUNED[kind].configs


def _key(c):
    return c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages


def test_prune_for_device_keeps_what_the_table_keeps():
    meta = dict(SPARSE_Q=0, SPARSE_K=0, HAS_RIGHT=True, HAS_LEFT=False, BLOCK_D=128, BLOCK_DV=128, PRECISION="tf32")
    for kind in ("fwd", "dq", "dkdv"):
        kept = {_key(c) for c in prune_for_device(kind, arch=90, limit=SHARED_LIMIT[90])(_configs(kind), {}, **meta)}
        assert kept == {(r["block_m"], r["block_n"], r["warps"], r["stages"])
                        for r in _rows(kernel=kind, arch=90, head_dim=128, variant="dense-causal", kept=True)}


def test_prune_for_device_follows_the_device_limit_dtype_and_sparse_blocks():
    meta = dict(SPARSE_Q=0, SPARSE_K=0, HAS_RIGHT=False, HAS_LEFT=False, BLOCK_D=64, BLOCK_DV=64, PRECISION="tf32")
    configs = _configs("fwd")
    small = prune_for_device("fwd", arch=86, limit=101376)(configs, {}, **meta)  # sm_86: 99 KB
    entry = FIT[("fwd", 80, 64, "dense")]
    assert small and all(entry[_key(c)][0] <= 101376 for c in small)
    fp32 = prune_for_device("fwd", arch=90, limit=SHARED_LIMIT[90])(configs, {}, **{**meta, "PRECISION": "ieee"})
    assert fp32 and all(2 * FIT[("fwd", 90, 64, "dense")][_key(c)][0] <= SHARED_LIMIT[90] for c in fp32)
    sparse = prune_for_device("fwd", arch=90, limit=SHARED_LIMIT[90])(configs, {}, **{**meta, "SPARSE_Q": 32,
                                                                                       "SPARSE_K": 32})
    assert sparse and all(32 % c.kwargs["BLOCK_M"] == 0 and 32 % c.kwargs["BLOCK_N"] == 0 for c in sparse)
    head_dim_32 = prune_for_device("fwd", arch=90, limit=SHARED_LIMIT[90])(configs, {}, **{**meta, "BLOCK_D": 32,
                                                                                            "BLOCK_DV": 32})
    assert {_key(c) for c in head_dim_32} == {_key(c) for c in prune_for_device("fwd", arch=90, limit=SHARED_LIMIT[90])(
        configs, {}, **meta)}  # a head dim below the table's smallest uses the D64 entry
    assert prune_for_device("fwd")(configs, {"Q": None}, **meta) == configs  # no CUDA tensor: nothing to read


def test_prune_table_entry_falls_back_to_the_least_spilling_config_that_fits():
    entry = {(1,): (100, 8), (2,): (100, 4), (3,): (10 ** 9, 0)}
    assert prune_table_entry(entry, 90) == [(2,)]
    assert prune_table_entry({(1,): (10 ** 9, 0), (2,): (10 ** 8, 0)}, 90) == [(2,)]


# The recompiled subset: (kernel, arch, head dim, variant, config), each a config the autotuner keeps.
SUBSET = [
    ("fwd", 90, 128, "dense-causal", (128, 64, 8, 3)),
    ("dq", 90, 128, "dense-causal", None),
    ("dkdv", 90, 128, "dense-causal", (32, 64, 8, 2)),
    ("dkdv", 80, 128, "dense", None),
    ("fwd", 80, 64, "sparse", None),
]


def _subset_jobs():
    jobs = []
    for kind, arch, head_dim, variant, cfg in SUBSET:
        if cfg is None:
            cfg = next((r["block_m"], r["block_n"], r["warps"], r["stages"])
                       for r in _rows(kernel=kind, arch=arch, head_dim=head_dim, variant=variant, kept=True))
        jobs.append(kernel_report.flash_job(kind, arch, head_dim, variant, cfg))
    jobs.append(kernel_report.linear_job("_output_fwd", 90, 64, True))
    if hasattr(flash, "TMA_CONFIGS"):
        jobs.append(kernel_report.flash_job("fwd_tma", 90, 128, "dense-causal", flash.TMA_CONFIGS[0]))
    return jobs


def test_recompiled_subset_matches_the_committed_table():
    from cuda_compile import compile_in_subprocess
    result = compile_in_subprocess(_subset_jobs(), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    fresh = [json.loads(line[3:]) for line in result.stdout.splitlines() if line.startswith("ok ")]
    assert len(fresh) == len(_subset_jobs())
    committed = {kernel_report.row_key(r): r for r in TABLE}
    for row in fresh:
        row = kernel_report.finish_row({**row, **row["tag"]})
        old = committed[kernel_report.row_key(row)]
        where = kernel_report.row_key(row)
        assert row["ok"], (where, row.get("error"))
        assert row["spill"] <= max(old["spill"], SPILL_BUDGET), f"{where} newly spills: {row['spill']} B"
        assert row["shared"] <= SHARED_LIMIT[row["arch"]] or not old["fits"], f"{where} outgrew shared memory"
        assert row["mma"].split(".")[0] == old["mma"].split(".")[0] or old["mma"] == "none", (where, row["mma"])
        assert row["tma"] == old["tma"], where


def test_report_script_help_runs():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "kernel_report.py"), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--only" in out.stdout
    assert triton.__version__  # the table records the version it was made with (env.json)
