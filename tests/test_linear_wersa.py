"""WERSA: the Haar transform (perfect reconstruction, Parseval, band linearity), gains 1 == random-
feature attention, the output == the quadratic form A v / A 1 (float64), gradients (incl. gains and
WERSAGates), and the refusal of causal calls."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.methods import wersa as wersa_module
from attnzoo.methods.wersa import WERSAGates, haar_dwt, haar_idwt, padded_length, wavelet_filter
from attnzoo.reference import exact_output
from attnzoo.reference import wersa as oracle
from linear_helpers import BACKENDS, FP32_TOL, rel_err, qkv

PARAMS = {"levels": 2, "num_features": 256, "gains": None, "seed": 0}  # the registry's defaults


def _exact(q, k, v, **params):
    return exact_output("wersa", q, k, v, causal=False, scale=q.shape[-1] ** -0.5, params={**PARAMS, **params},
                        inputs={})


@given(n_log2=st.integers(0, 6), levels=st.integers(0, 4), seed=st.integers(0, 2**31 - 1))
@settings()
def test_haar_is_orthonormal_and_invertible(n_log2, levels, seed):
    n = padded_length(2 ** n_log2, levels)
    x = torch.randn(2, 3, n, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    bands = haar_dwt(x, levels)
    assert [b.shape[2] for b in bands] == [n >> j for j in range(1, levels + 1)] + [n >> levels]
    assert (haar_idwt(bands) - x).abs().max() < 1e-12
    energy = sum(b.square().sum() for b in bands)
    assert abs(energy - x.square().sum()) < 1e-10 * x.square().sum()  # Parseval
    for fast, loop in zip(bands, oracle.haar_dwt(x, levels)):
        assert (fast - loop).abs().max() < 1e-12
    assert (haar_idwt(bands) - oracle.haar_idwt(bands)).abs().max() < 1e-12
    assert padded_length(2 ** n_log2, levels) == max(2 ** n_log2, 2 ** levels)


@given(n=st.integers(1, 40), levels=st.integers(0, 3), per_token=st.booleans(), batch=st.integers(1, 2),
       seed=st.integers(0, 2**31 - 1))
@settings()
def test_filter_equals_its_definition(n, levels, per_token, batch, seed):
    """IDWT(gains * DWT(gelu(x))) against attnzoo.reference.wersa (Haar by loops; coefficient i of a
    band of band_len coefficients takes the gain of token floor(i * N / band_len))."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 2, n, 3, generator=gen, dtype=torch.float64)
    shape = (batch, n, levels + 1) if per_token else (levels + 1,)
    gains = torch.rand(shape, generator=gen, dtype=torch.float64) * 2
    assert (wavelet_filter(x, levels, gains) - oracle.wavelet_filter(x, levels, gains)).abs().max() < 1e-12


def test_band_gains_act_linearly():
    """Gains scale the coefficients: the bands' separate contributions sum to the unit-gain filter,
    and a band with gain c contributes c times its unit contribution."""
    x = torch.randn(1, 2, 23, 4, dtype=torch.float64)
    levels = 3
    unit = wavelet_filter(x, levels, torch.ones(levels + 1, dtype=torch.float64))
    per_band = [wavelet_filter(x, levels, F.one_hot(torch.tensor(i), levels + 1).double()) for i in range(levels + 1)]
    assert (sum(per_band) - unit).abs().max() < 1e-12
    assert (unit - F.gelu(x)).abs().max() < 1e-12  # pad, transform, crop: perfect reconstruction
    scaled = wavelet_filter(x, levels, torch.tensor([1.0, 2.5, 1.0, 1.0], dtype=torch.float64))
    assert (scaled - unit - 1.5 * per_band[1]).abs().max() < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_gains_are_random_feature_attention(backend):
    q, k, v = qkv(seed=1)
    m = 32
    out = attnzoo.get("wersa", num_features=m, chunk_size=16)(q, k, v, backend=backend)
    omega = oracle.omega(16, m, 0)  # standard Gaussian from torch.Generator().manual_seed(0)
    phi_q, phi_k = (torch.relu(F.gelu(x.double()) @ omega) / math.sqrt(m) for x in (q, k))
    scores = phi_q @ phi_k.transpose(-1, -2)
    assert rel_err(out, scores @ v.double() / (scores.sum(-1, keepdim=True) + 1e-6)) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gain_shape", ["per_band", "per_token"])
def test_matches_quadratic_reference_with_gradients(backend, gain_shape):
    q, k, v = qkv(seed=2)
    B, _, N, _ = q.shape
    gen = torch.Generator().manual_seed(3)
    gains = torch.rand(3, generator=gen) + 0.5 if gain_shape == "per_band" else torch.rand(B, N, 3, generator=gen)
    params = dict(levels=2, num_features=32, seed=7)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, gains)]
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v, gains)]
    out = attnzoo.get("wersa", chunk_size=16, **params)(*leaves[:3], gains=leaves[3], backend=backend)
    want = _exact(*ref_leaves[:3], gains=ref_leaves[3], **params)
    assert rel_err(out, want) < FP32_TOL
    weight = torch.randn(want.shape, dtype=torch.float64)
    (out.double() * weight).sum().backward()
    (want * weight).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < 1e-4  # gelu/relu features in fp32 add rounding before the kernel


@given(batch=st.integers(1, 2), heads=st.integers(1, 2), n=st.integers(1, 40), dv=st.sampled_from([16, 24]),
       levels=st.integers(0, 3), per_token=st.booleans(), features=st.sampled_from([16, 64]),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**31 - 1))
@settings()
def test_equals_the_oracle(batch, heads, n, dv, levels, per_token, features, backend, seed):
    q, k, v = qkv(B=batch, H=heads, N=n, D=16, Dv=dv, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    gains = torch.rand((batch, n, levels + 1) if per_token else (levels + 1,), generator=gen) + 0.25
    params = dict(levels=levels, num_features=features, seed=seed % 7)
    out = attnzoo.get("wersa", chunk_size=16, **params)(q, k, v, gains=gains, backend=backend)
    assert rel_err(out, _exact(q, k, v, gains=gains, **params), floor=1.0) < FP32_TOL  # N = 1 may give 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_without_features_outputs_zero(backend):
    """gelu(0) = 0 gives phi(q~_t) = 0: numerator and denominator vanish and the row is 0, not NaN."""
    q, k, v = qkv(N=20, seed=8)
    q[:, :, 5] = 0.0
    out = attnzoo.get("wersa", num_features=32, chunk_size=16)(q, k, v, backend=backend)
    assert torch.isfinite(out).all() and (out[:, :, 5] == 0).all() and (out[:, :, 4] != 0).all()


def test_seed_fixes_the_features():
    q, k, v = qkv(seed=4)
    fn = attnzoo.get("wersa", num_features=32)
    first = fn(q, k, v, backend="torch", seed=1)
    assert torch.equal(first, fn(q, k, v, backend="torch", seed=1))
    assert not torch.allclose(first, fn(q, k, v, backend="torch", seed=2))


def test_gate_module_gives_gains_and_trains():
    torch.manual_seed(5)
    B, N, hidden, levels = 2, 37, 12, 2
    gates = WERSAGates(hidden, levels)
    gains = gates(torch.randn(B, N, hidden))
    assert gains.shape == (B, N, levels + 1) and (gains > 0).all() and (gains < 1).all()
    q, k, v = qkv(B=B, N=N, seed=6)
    out = attnzoo.get("wersa", num_features=32)(q, k, v, gains=gains, backend="torch")
    (out * torch.randn_like(out)).sum().backward()
    for name, p in gates.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_invalid_calls_raise_and_say_why():
    q, k, v = qkv(N=8)
    with pytest.raises(ValueError, match="non-causal"):
        attnzoo.get("wersa")(q, k, v, causal=True)
    with pytest.raises(ValueError, match="dyadic block"):
        wersa_module.wersa(q, k, v, causal=True, scale=1.0, backend="torch")
    with pytest.raises(ValueError, match=r"gains has shape \(2, 8, 2\)"):
        attnzoo.get("wersa")(q, k, v, gains=torch.rand(2, 8, 2))
    with pytest.raises(TypeError, match="unknown parameter.*bandwidth"):
        attnzoo.get("wersa", bandwidth=2.0)  # it had no effect (relu is positively homogeneous): removed
    with pytest.raises(ValueError, match="levels"):
        attnzoo.get("wersa", levels=-1)(q, k, v)
    with pytest.raises(ValueError, match="decoding step"):
        attnzoo.linear_state("wersa")


def test_gates_mlp_is_hidden_to_a_quarter_to_the_bands():
    """WERSAGates' MLP: hidden -> max(1, hidden // 4) -> levels + 1 (one unit at the smallest sizes)."""
    for hidden, width in ((64, 16), (4, 1), (3, 1)):
        gates = WERSAGates(hidden, levels=2, kernel_size=3)
        assert (gates.mlp[0].in_features, gates.mlp[0].out_features, gates.mlp[2].out_features) == (hidden, width, 3)
