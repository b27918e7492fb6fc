"""The public API: registry, get/info/attention/register, validation errors, backends, CLI."""

import subprocess
import sys

import pytest
import torch

import attnzoo
from attnzoo import reference
from attnzoo.cli import main as cli_main


def _qkv(B=1, Hq=2, Hk=1, N=9, M=11, D=16, Dv=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, N, D, generator=gen).to(dtype), torch.randn(B, Hk, M, D, generator=gen).to(dtype),
            torch.randn(B, Hk, M, Dv, generator=gen).to(dtype))


# ---- registry ---------------------------------------------------------------------------------

def test_list_methods_is_sorted_and_has_dense():
    names = attnzoo.list_methods()
    assert "dense" in names and names == sorted(names)


def test_every_registered_method_loads_and_is_well_formed():
    for name in attnzoo.list_methods():
        entry = attnzoo.info(name)
        assert entry.family in ("exact", "sparse", "linear"), name
        assert entry.paper, name
        assert callable(entry.load()), name
        assert set(entry.supports.backends) <= {"triton", "torch", "fla"}, name
        assert entry.supports.causal or entry.supports.non_causal, name


def test_info_reports_defaults():
    entry = attnzoo.info("dense")
    assert entry.params["window_size"] == (-1, -1) and entry.params["softcap"] == 0.0
    assert entry.supports.backward and entry.supports.gqa


def test_unknown_method_lists_known_names():
    with pytest.raises(KeyError, match="known methods: .*dense"):
        attnzoo.get("no_such_method")


def test_unknown_parameter_is_named():
    with pytest.raises(TypeError, match="threshold"):
        attnzoo.get("dense", threshold=0.9)
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="bogus"):
        attnzoo.get("dense")(q, k, v, bogus=1)


def test_bound_parameters_apply_and_call_time_ones_override():
    q, k, v = _qkv()
    windowed = attnzoo.get("dense", window_size=(2, 0))
    assert windowed.params["window_size"] == (2, 0)
    want = reference.attention(q.double(), k.double(), v.double(), window_size=(2, 0))
    torch.testing.assert_close(windowed(q, k, v).double(), want, rtol=1e-5, atol=1e-5)
    full = windowed(q, k, v, window_size=(-1, -1))
    torch.testing.assert_close(full.double(), reference.attention(q.double(), k.double(), v.double()),
                               rtol=1e-5, atol=1e-5)


def test_attention_one_shot_equals_get():
    q, k, v = _qkv(seed=3)
    torch.testing.assert_close(attnzoo.attention(q, k, v, method="dense", causal=True),
                               attnzoo.get("dense")(q, k, v, causal=True), rtol=0, atol=0)


def test_register_third_party_method():
    def doubled_dense(q, k, v, *, causal, scale, backend, factor=2.0):
        return factor * attnzoo.get("dense")(q, k, v, causal=causal, scale=scale, backend=backend)

    attnzoo.register("doubled_dense_test", doubled_dense, family="exact", paper="test", params={"factor": 2.0},
                     supports={"backends": ["torch", "triton"]})
    try:
        assert "doubled_dense_test" in attnzoo.list_methods()
        q, k, v = _qkv(seed=4)
        got = attnzoo.get("doubled_dense_test", factor=3.0)(q, k, v, causal=True)
        torch.testing.assert_close(got, 3.0 * attnzoo.get("dense")(q, k, v, causal=True), rtol=1e-6, atol=1e-6)
        with pytest.raises(ValueError, match="already registered"):
            attnzoo.register("doubled_dense_test", doubled_dense, family="exact")
    finally:
        attnzoo.registry.REGISTRY._entries().pop("doubled_dense_test")


def test_register_rejects_bad_family():
    with pytest.raises(ValueError, match="family"):
        attnzoo.register("bad_family_test", lambda q, k, v, **kw: q, family="quadratic")


# ---- validation -------------------------------------------------------------------------------

@pytest.mark.parametrize("mutate, error, pattern", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must have 4 dims .* got shape \(2, 9, 16\)"),
    (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor, got ndarray"),
    (lambda q, k, v: (q, k.double(), v), TypeError, "k has dtype torch.float64"),
    (lambda q, k, v: (q.half(), k, v), TypeError, "share one dtype"),
    (lambda q, k, v: (q.int(), k, v), TypeError, "q has dtype torch.int32"),
    (lambda q, k, v: (q.expand(2, -1, -1, -1), k, v), ValueError, "batch sizes differ: q 2, k 1"),
    (lambda q, k, v: (q[:, :1].expand(1, 3, -1, -1), k.expand(1, 2, -1, -1), v.expand(1, 2, -1, -1)),
     ValueError, "multiple of key/value heads .* q heads 3, k heads 2"),
    (lambda q, k, v: (q, k, v.expand(1, 2, -1, -1)), ValueError, "same number of heads, got k 1 and v 2"),
    (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, "same sequence length, got k 11 and v 5"),
    (lambda q, k, v: (q[:, :, :0], k, v), ValueError, "q sequence length must be >= 1"),
    (lambda q, k, v: (q, k[:, :, :0], v[:, :, :0]), ValueError, "k/v sequence length must be >= 1"),
    (lambda q, k, v: (q, k[..., :8], v), ValueError, "head dims must match, got q 16 and k 8"),
    (lambda q, k, v: (q[..., :8], k[..., :8], v), ValueError, r"head dim must be in \[16, 256\] .* got 8"),
    (lambda q, k, v: (torch.cat([q] * 17, -1), torch.cat([k] * 17, -1), v), ValueError, "got 272"),
])
def test_invalid_inputs_raise_naming_the_argument(mutate, error, pattern):
    q, k, v = mutate(*_qkv())
    with pytest.raises(error, match=pattern):
        attnzoo.get("dense")(q, k, v)


@pytest.mark.parametrize("kwargs, error, pattern", [
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale="0.1"), TypeError, "scale must be a float or None, got str"),
    (dict(causal=1), TypeError, "causal must be a bool, got int"),
    (dict(window_size=3), TypeError, "window_size must be a .left, right. pair"),
    (dict(window_size=(-2, 0)), ValueError, "window_size left must be an int >= -1"),
    (dict(softcap=-1.0), ValueError, "softcap must be a finite float >= 0"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(backend="fla"), ValueError, "method 'dense' has no 'fla' backend"),
])
def test_invalid_keywords_raise(kwargs, error, pattern):
    q, k, v = _qkv()
    with pytest.raises(error, match=pattern):
        attnzoo.get("dense")(q, k, v, **kwargs)


def test_method_without_gqa_rejects_grouped_heads():
    attnzoo.register("no_gqa_test", lambda q, k, v, **kw: q, family="exact", supports={"gqa": False})
    try:
        q, k, v = _qkv(Hq=2, Hk=1)
        with pytest.raises(ValueError, match="does not support grouped-query attention: q heads 2 != k heads 1"):
            attnzoo.get("no_gqa_test")(q, k, v)
    finally:
        attnzoo.registry.REGISTRY._entries().pop("no_gqa_test")


def test_causal_only_method_defaults_to_causal_and_rejects_non_causal():
    seen = {}

    def record(q, k, v, *, causal, scale, backend):
        seen["causal"] = causal
        return q

    attnzoo.register("causal_only_test", record, family="linear",
                     supports={"non_causal": False, "non_causal_note": "its state runs along the sequence"})
    try:
        q, k, v = _qkv()
        attnzoo.get("causal_only_test")(q, k, v)
        assert seen["causal"] is True
        with pytest.raises(ValueError, match="causal only; call it with causal=True: its state runs along"):
            attnzoo.get("causal_only_test")(q, k, v, causal=False)
    finally:
        attnzoo.registry.REGISTRY._entries().pop("causal_only_test")


# ---- backends ---------------------------------------------------------------------------------

def test_auto_backend_on_cpu_follows_the_interpreter_flag(monkeypatch):
    from attnzoo.ops.dispatch import resolve

    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("auto", cpu, ("triton", "torch"), "dense") == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert resolve("auto", cpu, ("triton", "torch"), "dense") == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve("triton", cpu, ("triton", "torch"), "dense")


def test_backends_agree():
    q, k, v = _qkv(B=2, Hq=4, Hk=2, N=33, M=21, D=32, Dv=16, seed=9)
    fn = attnzoo.get("dense")
    torch.testing.assert_close(fn(q, k, v, causal=True, backend="triton"), fn(q, k, v, causal=True, backend="torch"),
                               rtol=1e-5, atol=1e-5)


# ---- command line -----------------------------------------------------------------------------

def test_cli_list_prints_every_method(capsys):
    assert cli_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in attnzoo.list_methods():
        assert name in out
    assert cli_main(["list", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("| method | family |")


def test_cli_check_dense_passes(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the torch backend: quick on CPU
    assert cli_main(["check", "--methods", "dense"]) == 0
    out = capsys.readouterr().out
    assert "dense" in out and "ok" in out and "all 1 methods ok" in out


def test_check_reports_a_wrong_method_as_failure(monkeypatch):
    from attnzoo import check

    def wrong(q, k, v, *, causal, scale, backend):
        return attnzoo.get("dense")(q, k, v, causal=causal, scale=scale, backend=backend) + 1e-2

    attnzoo.register("wrong_test", wrong, family="exact", paper="test")
    try:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        (row,) = check.run(["wrong_test"], "cpu")
        assert row.status.startswith("FAIL: max error") and row.max_error > 5e-3
    finally:
        attnzoo.registry.REGISTRY._entries().pop("wrong_test")


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "attnzoo", "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "dense" in result.stdout


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("method", ["dense", "gla"])
def test_second_derivatives_raise_instead_of_being_wrong(method, backend):
    # the backward kernels are not differentiable: double backward must fail loudly, not return a
    # gradient that treats recomputed statistics as constants (our kernels' backwards are
    # once_differentiable; plain dense on the torch backend may run torch SDPA, whose backward torch
    # itself refuses to differentiate)
    q, k, v = (t.requires_grad_() for t in _qkv(Hq=2, Hk=2, N=8, M=8, seed=21))
    out = attnzoo.get(method)(q, k, v, causal=True, backend=backend)
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|derivative for .* is not implemented"):
        dq.square().sum().backward()
