"""flashbias: softmax(scale q k^T + U W^T) v through the flash kernel, against the float64 reference
with the explicit bias (METHODS.md, flashbias). Kernels run under the Triton interpreter (CPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.methods.flashbias import (
    alibi_factors, distance_factors, relative_position_bias, relative_position_factors, svd_factors,
)
from attnzoo.reference import attention, exact_output
from attnzoo.reference import flashbias as oracle

BACKENDS = st.sampled_from(["triton", "torch"])


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("ATTNZOO_POISON", "1")


@st.composite
def shapes(draw, max_len=40):
    """(B, Hq, Hk, N, M, D, Dv) with at most 4 (batch, query head) pairs: the interpreter is slow."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, 4 // (batch * kv_heads)))
    return (batch, kv_heads * group, kv_heads, draw(st.integers(1, max_len)), draw(st.integers(1, max_len)),
            draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 24])))


def make_qkv(shape, seed, dtype=torch.float32):
    B, Hq, Hk, N, M, D, Dv = shape
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, N, D, generator=gen, dtype=dtype), torch.randn(B, Hk, M, D, generator=gen, dtype=dtype),
            torch.randn(B, Hk, M, Dv, generator=gen, dtype=dtype))


def assert_close(actual, expected, rtol=1e-5):
    """fp32 kernel vs float64 reference: relative to the largest magnitude of the expected tensor."""
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(expected.abs().max().item(), 1.0))


def doubles(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


@given(shape=shapes(), rank=st.integers(1, 5), u_batch=st.sampled_from(["one", "all"]),
       u_heads=st.sampled_from(["one", "q"]), w_heads=st.sampled_from(["one", "kv", "q"]), causal=st.booleans(),
       scale=st.floats(0.05, 1.0), backend=BACKENDS, seed=st.integers(0, 2**31 - 1))
@settings()
def test_factors_match_biased_reference_with_gradients(shape, rank, u_batch, u_heads, w_heads, causal, scale, backend,
                                                       seed):
    B, Hq, Hk, N, M, D, Dv = shape
    q, k, v = make_qkv(shape, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(1 if u_batch == "one" else B, 1 if u_heads == "one" else Hq, N, rank, generator=gen)
    u = u / rank ** 0.25
    w = torch.randn(B, {"one": 1, "kv": Hk, "q": Hq}[w_heads], M, rank, generator=gen) / rank ** 0.25
    leaves = [t.requires_grad_() for t in (q, k, v, u, w)]
    out = attnzoo.get("flashbias")(q, k, v, causal=causal, scale=scale, bias_factors=(u, w), backend=backend)

    q64, k64, v64, u64, w64 = doubles(*leaves)
    expected = exact_output("flashbias", q64, k64, v64, causal=causal, scale=scale, params={"rank": None},
                            inputs={"bias_factors": (u64, w64)})
    assert_close(out, expected)

    grad_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, leaves, grad_out)
    expected_grads = torch.autograd.grad(expected, [q64, k64, v64, u64, w64], grad_out.double())
    for name, got, want in zip("q k v U W".split(), grads, expected_grads):
        assert got.shape == want.shape, name
        assert_close(got, want, rtol=2e-5)


@given(shape=shapes(), causal=st.booleans(), backend=BACKENDS, seed=st.integers(0, 2**31 - 1))
@settings()
def test_zero_factors_equal_dense(shape, causal, backend, seed):
    B, Hq, Hk, N, M, D, Dv = shape
    q, k, v = make_qkv(shape, seed)
    u, w = torch.zeros(B, Hq, N, 2), torch.randn(1, 1, M, 2, generator=torch.Generator().manual_seed(seed))
    out = attnzoo.get("flashbias")(q, k, v, causal=causal, bias_factors=(u, w), backend=backend)
    assert_close(out, attention(*doubles(q, k, v), causal=causal))


@given(shape=shapes(), backend=BACKENDS, seed=st.integers(0, 2**31 - 1))
@settings()
def test_alibi_equals_reference_with_explicit_alibi_bias(shape, backend, seed):
    B, Hq, Hk, N, M, D, Dv = shape
    q, k, v = make_qkv(shape, seed)
    slopes = torch.rand(Hq, generator=torch.Generator().manual_seed(seed)) + 0.01
    out = attnzoo.get("flashbias")(q, k, v, causal=True, alibi_slopes=slopes, backend=backend)
    i = torch.arange(N, dtype=torch.float64)[:, None]
    j = torch.arange(M, dtype=torch.float64)[None, :]
    bias = -slopes.double()[:, None, None] * (i + M - N - j)  # flash-attn's causal ALiBi, row constant kept
    assert_close(out, attention(*doubles(q, k, v), causal=True, bias=bias))


@given(m=st.integers(1, 70_000), slope_seed=st.integers(0, 2**31 - 1))
@settings()
def test_alibi_factors_are_exact_in_bfloat16(m, slope_seed):
    slopes = torch.rand(3, generator=torch.Generator().manual_seed(slope_seed))
    u, w = (x.to(torch.bfloat16) for x in alibi_factors(slopes, 2, m))
    keys = torch.arange(m - 5, m) if m > 5 else torch.arange(m)  # the largest positions need the most digits
    product = u[0, :, 0].double() @ w[0, 0, keys].double().T  # (H, R) @ (R, len(keys))
    rounded_slopes = slopes.to(torch.bfloat16).double()
    torch.testing.assert_close(product, rounded_slopes[:, None] * keys.double(), rtol=0, atol=0)


@given(dtype=st.sampled_from([torch.float16, torch.bfloat16]), n=st.integers(1, 300), seed=st.integers(0, 2**31 - 1))
@settings()
def test_low_precision_alibi_past_256_keys_is_as_accurate_as_a_same_dtype_reference(dtype, n, seed):
    """flash-attn's recipe: error vs float64 at most twice that of the reference run in the same dtype.
    M = 300 needs two position digits; the torch backend keeps this test fast."""
    q, k, v = make_qkv((1, 2, 1, n, 300, 32, 16), seed)
    slopes = torch.tensor([0.5, 2.0 ** -4])
    i = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(300, dtype=torch.float64)[None, :]
    bias = -slopes.double()[:, None, None] * (i + 300 - n - j)
    expected = attention(*doubles(q, k, v), causal=True, bias=bias)
    same_dtype = attention(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, bias=bias.to(dtype))
    out = attnzoo.get("flashbias")(q.to(dtype), k.to(dtype), v.to(dtype), causal=True, alibi_slopes=slopes,
                                   backend="torch")
    allowed = 2 * (same_dtype.double() - expected).abs().max().item() + 1e-3
    assert (out.double() - expected).abs().max().item() <= allowed


def test_alibi_rejects_non_causal():
    q, k, v = make_qkv((1, 2, 2, 8, 8, 16, 16), seed=0)
    with pytest.raises(ValueError, match="causal"):
        attnzoo.get("flashbias")(q, k, v, causal=False, alibi_slopes=torch.rand(2))



@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_a_bias_that_is_not_finite_is_rejected(bad):
    """A full bias is factorised by SVD, which a NaN or inf would spread over every entry: refused."""
    q, k, v = make_qkv((1, 2, 2, 8, 8, 16, 16), seed=0)
    bias = torch.randn(1, 2, 8, 8)
    bias[0, 1, 3, 4] = bad
    with pytest.raises(ValueError, match="bias"):
        attnzoo.get("flashbias")(q, k, v, causal=False, bias=bias, backend="torch")

@given(shape=shapes(max_len=24), causal=st.booleans(), backend=BACKENDS, seed=st.integers(0, 2**31 - 1))
@settings()
def test_full_rank_bias_equals_reference(shape, causal, backend, seed):
    B, Hq, Hk, N, M, D, Dv = shape
    q, k, v = make_qkv(shape, seed)
    bias = torch.randn(B, 1, N, M, generator=torch.Generator().manual_seed(seed + 1))
    out = attnzoo.get("flashbias", rank=min(N, M))(q, k, v, causal=causal, bias=bias, backend=backend)
    assert_close(out, attention(*doubles(q, k, v), causal=causal, bias=bias.double()), rtol=2e-5)


@given(n=st.integers(2, 24), m=st.integers(2, 24), seed=st.integers(0, 2**31 - 1))
@settings()
def test_svd_error_falls_with_rank_and_is_exact_at_full_rank(n, m, seed):
    bias = torch.randn(2, n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    errors, energies = [], []
    for rank in range(1, min(n, m) + 1):
        u, w, kept = svd_factors(bias, rank)
        errors.append(torch.linalg.matrix_norm(u @ w.transpose(-1, -2) - bias).max().item())
        energies.append(kept)
    assert all(a >= b - 1e-12 for a, b in zip(errors, errors[1:]))
    assert all(a <= b + 1e-12 for a, b in zip(energies, energies[1:]))
    assert errors[-1] < 1e-10 * torch.linalg.matrix_norm(bias).max().item()
    assert energies[-1] == pytest.approx(1.0)


@given(n=st.integers(2, 24), m=st.integers(2, 24), true_rank=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
@settings()
def test_default_rank_keeps_the_energy_target(n, m, true_rank, seed):
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, true_rank, generator=gen) @ torch.randn(true_rank, m, generator=gen)
    bias = low + 1e-4 * torch.randn(n, m, generator=gen)
    u, w, kept = svd_factors(bias)
    assert kept >= 0.999
    assert u.shape[-1] <= min(true_rank, n, m)  # the noise floor holds far less than 0.1% of the energy
    if u.shape[-1] > 1:
        assert svd_factors(bias, u.shape[-1] - 1).kept_energy < 0.999  # and the rank is the smallest


def test_explicit_low_rank_warns_with_kept_energy():
    q, k, v = make_qkv((1, 1, 1, 16, 16, 16, 16), seed=3)
    bias = torch.randn(1, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    with pytest.warns(UserWarning, match="% of the bias energy"):
        attnzoo.get("flashbias", rank=2)(q, k, v, bias=bias, backend="torch")


@given(n=st.integers(1, 30), m=st.integers(1, 30), channels=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
@settings()
def test_distance_factors_reproduce_squared_distances(n, m, channels, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n, channels, generator=gen, dtype=torch.float64) + 5  # away from the origin
    y = torch.randn(2, m, channels, generator=gen, dtype=torch.float64) + 5
    u, w = distance_factors(x, y, weight=-0.5)
    assert u.shape[-1] == w.shape[-1] == 3 * channels
    torch.testing.assert_close(u @ w.transpose(-1, -2), -0.5 * torch.cdist(x, y) ** 2)


@given(n=st.integers(1, 20), m=st.integers(1, 20), seed=st.integers(0, 2**31 - 1))
@settings()
def test_relative_position_factors_reproduce_the_table_bias(n, m, seed):
    table = torch.randn(2, n + m - 1, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bias = relative_position_bias(table, n, m)
    assert torch.equal(bias, oracle.relative_position_bias(table, n, m))
    # the table is indexed by offset + M - 1, offsets -(M - 1) .. N - 1 (query i sits at key i + M - N):
    assert torch.equal(bias[:, n - 1, m - 1], table[:, m - 1])  # last query, last key: offset 0
    assert torch.equal(bias[:, n - 1, 0], table[:, 0])  # last query, first key: offset -(M - 1)
    assert torch.equal(bias[:, 0, m - 1], table[:, n + m - 2])  # first query, last key: offset N - 1
    u, w, kept = relative_position_factors(table, n, m, rank=min(n, m))
    assert u.shape == (1, 2, n, min(n, m)) and kept == pytest.approx(1.0)
    torch.testing.assert_close(u @ w.transpose(-1, -2), oracle.relative_position_bias(table, n, m)[None])


@given(shape=shapes(max_len=24), seed=st.integers(0, 2**31 - 1))
@settings()
def test_row_constant_column_leaves_output_unchanged(shape, seed):
    B, Hq, Hk, N, M, D, Dv = shape
    q, k, v = make_qkv(shape, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    u, w = torch.randn(B, Hq, N, 2, generator=gen), torch.randn(B, Hk, M, 2, generator=gen)
    row_constant = torch.randn(B, Hq, N, 1, generator=gen)
    u_plus = torch.cat([u, row_constant], dim=-1)
    w_plus = torch.cat([w, torch.ones(B, Hk, M, 1)], dim=-1)
    fn = attnzoo.get("flashbias")
    assert_close(fn(q, k, v, bias_factors=(u_plus, w_plus), backend="torch"),
                 fn(q, k, v, bias_factors=(u, w), backend="torch").double())


def test_bias_gradient_at_full_rank_matches_reference():
    q, k, v = make_qkv((1, 2, 1, 12, 10, 16, 16), seed=5)
    bias = torch.randn(1, 2, 12, 10, generator=torch.Generator().manual_seed(6), requires_grad=True)
    out = attnzoo.get("flashbias", rank=10)(q, k, v, bias=bias, backend="torch")
    (grad,) = torch.autograd.grad(out.square().sum(), bias)
    bias64 = bias.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(attention(*doubles(q, k, v), bias=bias64).square().sum(), bias64)
    assert_close(grad, expected, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one of"),
    ({"bias_factors": "U", "alibi_slopes": torch.ones(2)}, "exactly one of"),
    ({"bias_factors": (torch.ones(1, 2, 8, 3), torch.ones(1, 2, 8, 2))}, r"bias_factors W has shape \(1, 2, 8, 2\)"),
    ({"bias_factors": (torch.ones(1, 3, 8, 3), torch.ones(1, 2, 8, 3))}, r"bias_factors U has shape \(1, 3, 8, 3\)"),
    ({"bias": torch.ones(1, 2, 8, 9)}, r"bias has shape \(1, 2, 8, 9\)"),
    ({"bias": torch.ones(1, 2, 8, 8), "rank": 9}, r"rank must be an int in \[1, 8\], got 9"),
    ({"alibi_slopes": torch.ones(2), "rank": 2}, "rank=2 sets the SVD rank"),
    ({"alibi_slopes": torch.ones(3)}, r"alibi_slopes has shape \(3,\)"),
])
def test_invalid_bias_inputs_raise_naming_the_argument(kwargs, match):
    q, k, v = make_qkv((1, 2, 2, 8, 8, 16, 16), seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        attnzoo.get("flashbias")(q, k, v, causal=True, backend="torch", **kwargs)


def test_triton_rejects_a_concatenated_head_dim_above_the_kernel_limit():
    q, k, v = make_qkv((1, 1, 1, 8, 8, 256, 16), seed=0)
    u, w = torch.ones(1, 1, 8, 1), torch.ones(1, 1, 8, 1)
    with pytest.raises(ValueError, match=r"D \+ R = 256 \+ 1"):
        attnzoo.get("flashbias")(q, k, v, bias_factors=(u, w), backend="triton")
