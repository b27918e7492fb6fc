"""`attnzoo bench`: the --quick sweep end to end, YAML configs, flag errors, and the pieces it reports.

The --quick run is made once per module and its outputs are checked by several tests. To keep the
suite fast it runs one sequence length (N = 128) instead of two and one repeat per measurement; the
methods, modes, dtype and device are the preset's. The other sweeps are tiny and write no plots.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo.bench import main
from attnzoo.bench.config import QUICK, SweepConfig, build_parser, load_yaml, resolve
from attnzoo.bench.contenders import Case, ZooMethod
from attnzoo.bench.inputs import make_qkv
from attnzoo.bench.metrics import computed_flops, dense_equivalent_flops, density
from attnzoo.bench.plots import NAMES as PLOT_NAMES
from attnzoo.bench.plots import pareto_front
from attnzoo.bench.progress import Progress
from attnzoo.bench.sweep import COLUMNS
from attnzoo.block_mask import BlockMask
from attnzoo.registry import REGISTRY

CPU = torch.device("cpu")
ROOT = Path(__file__).resolve().parent.parent


def read_csv(path):
    lines = path.read_text().splitlines()
    header_lines = [line for line in lines if line.startswith("#")]
    reader = csv.DictReader(line for line in lines if not line.startswith("#"))
    return header_lines, reader.fieldnames, list(reader)


def number(cell: str) -> float | None:
    return None if cell == "" else float(cell)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    assert main(["--quick", "--seqlens", "128", "--repeats", "1", "--out", str(out)]) == 0
    return out


def test_quick_csv_has_the_documented_columns_and_sane_values(quick):
    header_lines, columns, rows = read_csv(quick / "bench.csv")
    assert tuple(columns) == COLUMNS
    assert any("CPU timings" in line for line in header_lines)
    assert any(line.startswith("# command: attnzoo bench --quick --seqlens 128") for line in header_lines)
    assert {(r["method"], r["mode"], r["seqlen"]) for r in rows if r["method"] == "dense"} == {
        ("dense", mode, "128") for mode in ("fwd", "fwd+bwd")}
    for row in rows:
        assert number(row["time_ms"]) > 0
        assert number(row["tflops_dense_equiv"]) > 0
        assert math.isfinite(number(row["rel_err_vs_dense"]))
        assert row["causal"] == "True" and row["dtype"] == "float32"  # one comparison, one flag
        if row["density"]:
            assert 0 < number(row["density"]) <= 1
        if row["estimator_share"]:
            assert 0 <= number(row["estimator_share"]) <= 1
        assert row["peak_mem_mib"] == ""  # not measured on CPU
    for row in rows:
        if row["method"] == "dense":
            assert number(row["rel_err_vs_dense"]) == 0
            assert number(row["speedup_vs_dense"]) == 1
            assert number(row["density"]) == 1


def test_quick_json_header_and_rows_match_the_csv(quick):
    document = json.loads((quick / "bench.json").read_text())
    head = document["header"]
    for key in ("device", "timing", "command", "attnzoo", "torch", "triton", "date_utc", "config"):
        assert head[key], key
    assert head["device_type"] == "cpu" and "CPU timings" in head["timing"]
    assert head["attnzoo"] == attnzoo.__version__ and head["torch"] == torch.__version__
    assert document["columns"] == list(COLUMNS)
    assert len(document["rows"]) == len(read_csv(quick / "bench.csv")[2])
    for skipped in document["skipped"]:
        assert skipped["reason"] and skipped["method"]


def test_quick_writes_non_empty_png_plots(quick):
    pytest.importorskip("matplotlib")
    for name in PLOT_NAMES:
        data = (quick / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name


def tiny_config(tmp_path, **overrides) -> str:
    settings = {"methods": ["dense"], "seqlens": [64], "head_dims": [32], "modes": ["fwd"],
                "inputs": ["random"], "baselines": "none", "device": "cpu", "repeats": 1, "warmup": 0,
                "plots": False}
    settings.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return str(path)


def test_yaml_config_drives_the_sweep_and_flags_override_it(tmp_path):
    config = tiny_config(tmp_path, causal=[False], out=str(tmp_path / "from-yaml"))
    assert main(["--config", config]) == 0
    _, _, rows = read_csv(tmp_path / "from-yaml" / "bench.csv")
    assert [(r["method"], r["mode"], r["causal"], r["seqlen"], r["head_dim"]) for r in rows] == [
        ("dense", "fwd", "False", "64", "32")]

    flags = ["--seqlens", "32,48", "--causal", "--no-plots", "--out", str(tmp_path / "flags")]
    assert main(["--config", tiny_config(tmp_path, plots=True), *flags]) == 0
    _, _, rows = read_csv(tmp_path / "flags" / "bench.csv")
    assert [(r["seqlen"], r["causal"]) for r in rows] == [("32", "True"), ("48", "True")]
    assert not list((tmp_path / "flags").glob("*.png"))


@pytest.mark.parametrize("argv, message", [
    (["--methods", "no_such_method"], "unknown method(s) no_such_method"),
    (["--modes", "fwd,bwd"], "modes: bwd"),
    (["--seqlens", "1k"], "seqlens must be an integer"),
    (["--seqlens", "0"], "seqlens must be an integer >= 1"),
    (["--dtype", "float64"], "dtypes: float64"),
    (["--device", "tpu"], "device: tpu"),
    (["--baselines", "xformers"], "unknown baseline(s) xformers"),
    (["--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
    (["--config", "/no/such/file.yaml"], "cannot read config file"),
])
def test_bad_flags_exit_2_with_a_message(argv, message, capsys, tmp_path):
    assert main(["--quick", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


def test_malformed_command_line_and_unknown_yaml_key_exit_2(tmp_path, capsys):
    assert main(["--no-such-flag"]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("seqlen: [64]\n")
    assert main(["--config", str(bad)]) == 2
    assert "unknown setting(s) seqlen" in capsys.readouterr().err


def test_defaults_are_the_quick_preset_without_cuda_and_the_gpu_sweep_with_it():
    no_flags = build_parser().parse_args([])
    assert resolve(no_flags, cuda_available=False).seqlens == QUICK["seqlens"]
    on_gpu = resolve(no_flags, cuda_available=True)
    assert on_gpu == SweepConfig() and on_gpu.seqlens == (1024, 2048, 4096, 8192)
    quick_on_gpu = resolve(build_parser().parse_args(["--quick"]), cuda_available=True)
    assert quick_on_gpu.device == "cpu"


@pytest.mark.parametrize("path", sorted((ROOT / "benchmarks" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_benchmark_configs_are_valid(path):
    settings = load_yaml(str(path))
    assert settings["methods"] == ("all",) and settings["seqlens"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_device_cuda_without_cuda_is_an_error(capsys):
    assert main(["--quick", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


@pytest.fixture
def scratch_registry(monkeypatch):
    """Methods registered inside a test vanish after it."""
    monkeypatch.setattr(REGISTRY, "_methods", dict(REGISTRY._entries()))
    monkeypatch.setattr(REGISTRY, "_functions", dict(REGISTRY._functions))


def _sdpa(q, k, v, *, causal, scale, backend):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _broken(q, k, v, *, causal, scale, backend):
    raise RuntimeError("kernel exploded")


def test_unsupported_and_failing_methods_are_skipped_with_reasons(tmp_path, scratch_registry):
    attnzoo.register("bench_noncausal", _sdpa, family="exact", supports={"causal": False})
    attnzoo.register("bench_broken", _broken, family="exact", supports={"backward": True})
    out = tmp_path / "out"
    config = tiny_config(tmp_path, methods=["dense", "bench_noncausal", "bench_broken"], causal=[True])
    assert main(["--config", config, "--out", str(out)]) == 0
    document = json.loads((out / "bench.json").read_text())
    assert [r["method"] for r in document["rows"]] == ["dense"]
    reasons = {s["method"]: s["reason"] for s in document["skipped"]}
    assert reasons == {"bench_noncausal": "non-causal only", "bench_broken": "RuntimeError: kernel exploded"}


def _diagonal_blocks(q, k, v, *, causal, scale, backend, return_block_mask=False):
    """A toy sparse method: keeps the diagonal 32x32 blocks, through the block_sparse kernel."""
    n_blocks = -(-q.shape[2] // 32)
    mask = BlockMask(torch.eye(n_blocks, dtype=torch.bool)[None, None], block_size=32)
    out = attnzoo.get("block_sparse")(q, k, v, causal=causal, scale=scale, backend=backend, block_mask=mask)
    return (out, mask) if return_block_mask else out


@pytest.mark.skipif("block_sparse" not in attnzoo.list_methods(), reason="needs the block_sparse method")
def test_sparse_rows_report_density_computed_flops_and_estimator_share(tmp_path, scratch_registry):
    attnzoo.register("bench_diagonal", _diagonal_blocks, family="sparse",
                     supports={"backward": True, "outputs": ["return_block_mask"]})
    out = tmp_path / "out"
    config = tiny_config(tmp_path, methods=["bench_diagonal"], causal=[True], modes=["fwd", "fwd+bwd"])
    assert main(["--config", config, "--out", str(out)]) == 0
    rows = json.loads((out / "bench.json").read_text())["rows"]
    sparse = [r for r in rows if r["method"] == "bench_diagonal"]
    assert [r["mode"] for r in sparse] == ["fwd", "fwd+bwd"]
    for row in sparse:
        assert row["density"] == 2 / 3  # 2 diagonal blocks of the 3 causal ones at N = 64
        assert 0 <= row["estimator_share"] <= 1
        # the two whole 32x32 diagonal tiles hold N*N/2 pairs: as many as causal dense-equivalent counts
        assert row["tflops_computed"] == pytest.approx(row["tflops_dense_equiv"])
        assert row["rel_err_vs_dense"] > 0.01  # it drops the off-diagonal block


def test_params_for_unknown_parameters_or_unswept_methods_are_errors(tmp_path, capsys):
    assert main(["--config", tiny_config(tmp_path, params={"dense": {"treshold": 1}})]) == 2
    assert "method 'dense' has no parameter(s) treshold" in capsys.readouterr().err
    assert main(["--config", tiny_config(tmp_path, params={"gla": {}})]) == 2
    assert "params given for method(s) not in the sweep: gla" in capsys.readouterr().err


def test_without_matplotlib_plots_are_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["--config", tiny_config(tmp_path, plots=True), "--out", str(tmp_path / "out")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert (tmp_path / "out" / "bench.csv").exists() and not list((tmp_path / "out").glob("*.png"))


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_a_tqdm_bar_on_a_terminal():
    pytest.importorskip("tqdm")
    terminal = Terminal()
    bar = Progress(2, stream=terminal)
    bar.advance("dense N=64")
    bar.close()
    assert "0/2 [" in terminal.getvalue() and "[1/2]" not in terminal.getvalue()


def test_progress_prints_numbered_lines_in_logs_and_without_tqdm(monkeypatch, capsys):
    log = Progress(2)  # pytest's captured stderr is not a terminal
    log.advance("dense N=64")
    log.note("skip x")
    log.close()
    assert capsys.readouterr().err.splitlines() == ["[1/2] dense N=64", "skip x"]

    monkeypatch.setitem(sys.modules, "tqdm", None)
    terminal = Terminal()
    Progress(1, stream=terminal).advance("dense N=64")
    assert terminal.getvalue() == "[1/1] dense N=64\n"


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_inputs_are_seeded(kind):
    shape = dict(batch=1, heads=4, kv_heads=2, seqlen=96, head_dim=16, dtype=torch.float32, device=CPU)
    first, again, other = (make_qkv(kind, seed=s, **shape) for s in (0, 0, 1))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert first[0].shape == (1, 4, 96, 16) and first[1].shape == first[2].shape == (1, 2, 96, 16)


def test_structured_inputs_have_locality_and_heavy_hitters():
    q, k, _ = make_qkv("structured", batch=1, heads=1, kv_heads=1, seqlen=1024, head_dim=64,
                       dtype=torch.float32, device=CPU, seed=0)
    scores = (q @ k.transpose(-1, -2))[0, 0] / 8
    near = torch.cat([scores.diagonal(offset) for offset in range(-4, 5)]).mean()
    assert near > scores.mean() + 5
    assert scores[:, 0].mean() > scores.mean() + 5  # the first token is a heavy hitter


def test_flops_are_dense_equivalent_and_halved_for_causal():
    full = dense_equivalent_flops(2, 3, 128, 128, 64, 64, causal=False, mode="fwd")
    assert full == 4 * 2 * 3 * 128 * 128 * 64
    assert dense_equivalent_flops(2, 3, 128, 128, 64, 64, causal=True, mode="fwd") == full / 2
    assert dense_equivalent_flops(2, 3, 128, 128, 64, 64, causal=False, mode="fwd+bwd") == 3.5 * full


def test_density_and_computed_flops_come_from_the_blocks_visited():
    every_block = BlockMask(torch.ones(1, 1, 4, 4, dtype=torch.bool), block_size=32)
    assert density(every_block, 128, 128, causal=True) == 1.0  # blocks above the diagonal do not count
    assert computed_flops(every_block, 1, 2, 128, 128, 16, 16, causal=False, mode="fwd") == \
        dense_equivalent_flops(1, 2, 128, 128, 16, 16, causal=False, mode="fwd")
    diagonal = BlockMask(torch.eye(4, dtype=torch.bool)[None, None], block_size=32)
    assert density(diagonal, 128, 128, causal=False) == 4 / 16
    assert density(diagonal, 128, 128, causal=True) == 4 / 10
    ragged = BlockMask(torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=32)
    assert computed_flops(ragged, 1, 1, 40, 40, 8, 8, causal=False, mode="fwd") == 2 * 40 * 40 * 16


def test_skip_reasons_follow_the_registry():
    dense = ZooMethod("dense")
    case = Case("random", "float32", True, 1, 2, 2, 64, 32)
    assert dense.skip_reason(case, CPU) is None
    assert dense.backend(CPU) == "torch"  # timing on CPU never uses the Triton interpreter
    assert "head dim 512" in dense.skip_reason(Case("random", "float32", True, 1, 2, 2, 64, 512), CPU)


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 1e-7), (2.0, 1e-3), (1.5, 1e-2), (3.0, 1e-1), (0.5, 1.0)]
    assert pareto_front(points) == [(1.0, 1e-7), (2.0, 1e-3), (3.0, 1e-1)]
