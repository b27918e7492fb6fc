"""BASED: the Taylor identity, normalisation invariants, chunked == float64 recurrence (causal and
non-causal, with and without the normaliser), causality, gradients and decoding steps."""

import functools
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import linear_state
from attnzoo.methods.based import taylor_feature_map
from attnzoo.reference import exact_output, taylor_features
from linear_helpers import BACKENDS, FP32_TOL, rel_err
from linear_helpers import qkv as shared_qkv

qkv = functools.partial(shared_qkv, D=4)  # BASED is meant for small q/k dims


def _exact(q, k, v, *, causal, scale, use_norm=True, eps=1e-6):
    """sum_s (1 + s + s^2/2) v_s / (sum_s (1 + s + s^2/2) + eps), s = scale q_t . k_s (attnzoo.reference.based)."""
    return exact_output("based", q, k, v, causal=causal, scale=scale, params={"use_norm": use_norm, "eps": eps},
                        inputs={})


def test_taylor_identity():
    q, k, _ = qkv(N=9, D=16)
    q, k = q.double(), k.double()
    scale = 0.3
    s = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    want = 1 + s + s ** 2 / 2
    got = torch.einsum("bhif,bhjf->bhij", taylor_feature_map(q * scale), taylor_feature_map(k))
    full = torch.einsum("bhif,bhjf->bhij", taylor_features(q, scale), taylor_features(k, scale))
    assert taylor_feature_map(q).shape[-1] == 1 + 16 + 16 * 17 // 2
    assert (got - want).abs().max() < 1e-12 and (full - want).abs().max() < 1e-12
    assert (want >= 0.5).all()  # 1 + s + s^2/2 = ((1 + s)^2 + 1) / 2: the normaliser never vanishes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_norm", [True, False])
def test_matches_float64_reference_with_gradients(backend, causal, use_norm):
    q, k, v = qkv(seed=1)
    scale = 0.6
    fn = attnzoo.get("based", use_norm=use_norm, chunk_size=16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    out = fn(*leaves, causal=causal, scale=scale, backend=backend)
    want = _exact(*ref_leaves, causal=causal, scale=scale, use_norm=use_norm)
    assert out.dtype == torch.float32 and rel_err(out, want) < FP32_TOL
    weight = torch.randn(want.shape, dtype=torch.float64)
    (out.double() * weight).sum().backward()
    (want * weight).sum().backward()
    for a, b in zip(leaves, ref_leaves):
        assert rel_err(a.grad, b.grad) < FP32_TOL


@given(batch=st.integers(1, 2), heads=st.integers(1, 2), n=st.integers(1, 40), d=st.sampled_from([2, 4, 8]),
       dv=st.sampled_from([16, 24]), causal=st.booleans(), use_norm=st.booleans(), scale=st.floats(0.1, 1.0),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**31 - 1))
@settings()
def test_equals_the_oracle(batch, heads, n, d, dv, causal, use_norm, scale, backend, seed):
    q, k, v = shared_qkv(B=batch, H=heads, N=n, D=d, Dv=dv, seed=seed)
    out = attnzoo.get("based", use_norm=use_norm, chunk_size=16)(q, k, v, causal=causal, scale=scale, backend=backend)
    assert rel_err(out, _exact(q, k, v, causal=causal, scale=scale, use_norm=use_norm), floor=1.0) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_output_is_a_weighted_average_of_values(backend, causal):
    q, k, v = qkv(seed=2, D=8, N=20)
    fn = attnzoo.get("based", chunk_size=16)
    constant = torch.full_like(v, 0.7) + torch.arange(v.shape[-1]) * 0.1
    assert rel_err(fn(q, k, constant, causal=causal, backend=backend), constant) < FP32_TOL
    out = fn(q, k, v, causal=causal, backend=backend)
    if not causal:  # every weight is >= 1/2 > 0, so each row is a convex combination of all values
        assert (out <= v.amax(2, keepdim=True) + 1e-5).all() and (out >= v.amin(2, keepdim=True) - 1e-5).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_future_does_not_change_the_past(backend):
    q, k, v = qkv(seed=3)
    fn = attnzoo.get("based", chunk_size=16)
    before = fn(q, k, v, causal=True, backend=backend)
    t = 20
    bumped = [x.clone() for x in (q, k, v)]
    for x in bumped:
        x[:, :, t + 1:] += torch.randn_like(x[:, :, t + 1:])
    after = fn(*bumped, causal=True, backend=backend)
    assert torch.equal(after[:, :, :t + 1], before[:, :, :t + 1])
    assert not torch.allclose(after[:, :, t + 1:], before[:, :, t + 1:])


@pytest.mark.parametrize("use_norm", [True, False])
def test_decoding_steps_equal_the_full_call(use_norm):
    q, k, v = qkv(N=10, seed=4)
    full = attnzoo.get("based", use_norm=use_norm)(q, k, v, causal=True, backend="torch")
    step, state, outs = linear_state("based"), None, []
    for t in range(q.shape[2]):
        o_t, state = step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, use_norm=use_norm)
        outs.append(o_t)
    assert rel_err(torch.cat(outs, dim=2), full) < FP32_TOL


def test_large_head_dim_warns():
    q, k, v = qkv(N=2, D=72)
    with pytest.warns(UserWarning, match="features per head"):
        attnzoo.get("based")(q, k, v, causal=True, backend="torch")


def test_mismatched_lengths_raise():
    q, k, v = qkv(N=8)
    with pytest.raises(ValueError, match="one length"):
        attnzoo.get("based")(q, k[:, :, :4], v[:, :, :4], causal=False)


def test_head_dims_above_64_warn_of_the_feature_count():
    """BASED projects q and k to a small dim first: from D = 65 (2211 features per head) the call warns,
    at D = 64 it does not."""
    def call(d):
        q, k, v = torch.randn(1, 1, 8, d), torch.randn(1, 1, 8, d), torch.randn(1, 1, 8, 4)
        attnzoo.get("based")(q, k, v, causal=True, backend="torch")

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        call(64)
    with pytest.warns(UserWarning, match="head dim 65"):
        call(65)
