"""The chunked linear-attention kernel (Triton under the interpreter, and the torch backend) against
the float64 token-by-token recurrence: outputs, final states and every gradient (dq, dk, dv, dg, dh0),
for chunk sizes that do not divide N, gated / ungated, causal / non-causal, normalised or not."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo import linear_state
from attnzoo.ops.linear import linear_attention
from attnzoo.reference import recurrent_linear_attention

FP32_TOL = 2e-5


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-30) -> float:
    """Max error over the largest reference value (at least `floor`)."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(floor)).item()


def make_inputs(B, H, N, K, V, *, gated, normalize, with_state, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, d, generator=gen) for d in (K, K, V))
    if normalize:  # normalised variants run on non-negative features
        q, k = q.abs(), k.abs()
    inputs = {"q": q, "k": k, "v": v}
    if gated:
        inputs["g"] = F.logsigmoid(torch.randn(B, H, N, K, generator=gen) + 1.0)
    if with_state:
        S = torch.randn(B, H, K, V, generator=gen)
        inputs["initial_state"] = (S, torch.rand(B, H, K, generator=gen)) if normalize else S
    return inputs


def run_kernel(inputs, backend, **kw):
    """Forward + backward of linear_attention on fp32 leaves; returns outputs and gradients."""
    leaves = {name: _leaf(x) for name, x in inputs.items()}
    out, final = linear_attention(**leaves, backend=backend, output_final_state=True, **kw)
    return out, final, leaves


def run_reference(inputs, *, normalize, **kw):
    leaves = {name: _leaf(x, torch.float64) for name, x in inputs.items()}
    h0 = leaves.pop("initial_state", None)
    S0, z0 = h0 if normalize and h0 is not None else (h0, None)
    out, S, z = recurrent_linear_attention(**leaves, initial_state=S0, initial_normalizer=z0, normalize=normalize, **kw)
    return out, ((S, z) if normalize else S), leaves


def _leaf(x, dtype=torch.float32):
    if isinstance(x, tuple):
        return tuple(_leaf(t, dtype) for t in x)
    return x.detach().to(dtype).clone().requires_grad_()


def _flat_tensors(x):
    return list(x) if isinstance(x, tuple) else [x]


def _loss(out, final, weights):
    parts = [out] + _flat_tensors(final)
    return sum((p.double() * w).sum() for p, w in zip(parts, weights))


def _grads(leaves):
    return [t.grad for x in leaves.values() for t in _flat_tensors(x)]


@pytest.mark.parametrize("backend", ["triton", "torch"])
@given(
    n=st.integers(1, 40), k_dim=st.integers(1, 20), v_dim=st.integers(1, 20), chunk=st.sampled_from([16, 32]),
    gated=st.booleans(), causal=st.booleans(), normalize=st.booleans(), with_state=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
@settings()
def test_chunked_matches_recurrent_reference(backend, n, k_dim, v_dim, chunk, gated, causal, normalize, with_state,
                                             seed):
    gated = gated and causal
    inputs = make_inputs(1, 2, n, k_dim, v_dim, gated=gated, normalize=normalize, with_state=with_state, seed=seed)
    # eps 0.5 keeps the normalised output well conditioned: with a tiny eps and N = 1 the gradient of
    # num / (den + eps) is an O(eps) cancellation residue that no fp32 computation resolves.
    kw = dict(scale=0.7, causal=causal, normalize=normalize, eps=0.5)
    out, final, leaves = run_kernel(inputs, backend, chunk_size=chunk, **kw)
    want, want_final, ref_leaves = run_reference(inputs, **kw)

    assert out.dtype == torch.float32 and all(s.dtype == torch.float32 for s in _flat_tensors(final))
    assert rel_err(out, want) < FP32_TOL
    for got_state, want_state in zip(_flat_tensors(final), _flat_tensors(want_final)):
        assert rel_err(got_state, want_state) < FP32_TOL

    gen = torch.Generator().manual_seed(seed + 1)
    weights = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in [want] + _flat_tensors(want_final)]
    _loss(out, final, weights).backward()
    _loss(want, want_final, weights).backward()
    # Gradients are sums of O(1) terms (O(1) inputs); dg = reverse cumsum of q dq - k dk cancels to ~0
    # where a gate has no effect (e.g. the first token without an initial state): measure the error
    # against max(|reference|, 1) so that such residues of size 1e-7 count as rounding.
    for got_grad, want_grad in zip(_grads(leaves), _grads(ref_leaves)):
        assert rel_err(got_grad, want_grad, floor=1.0) < FP32_TOL


@given(n=st.integers(1, 70), chunk=st.sampled_from([16, 32, 64]), gated=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings()
def test_torch_backend_is_exact_in_float64(n, chunk, gated, seed):
    """In float64 (a test-only dtype: the torch backend accumulates in float64 then) the chunked
    algorithm equals the recurrence to rounding: it is the same sum, regrouped."""
    inputs = make_inputs(2, 1, n, 8, 5, gated=gated, normalize=False, with_state=True, seed=seed)
    inputs = {name: x if name == "initial_state" else x.double() for name, x in inputs.items()}
    out, final = linear_attention(**inputs, scale=0.5, causal=True, backend="torch", output_final_state=True,
                                  chunk_size=chunk)
    want, want_final, _ = recurrent_linear_attention(**inputs, scale=0.5)
    assert rel_err(out, want) < 1e-12
    assert rel_err(final, want_final) < 1e-12


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strong_decay_keeps_only_the_current_token(backend):
    """g = -60 forgets everything before t: o_t = scale (q_t . k_t) v_t, with no overflow from
    exp(G_t - G_s) across the chunk."""
    inputs = make_inputs(1, 2, 37, 16, 16, gated=False, normalize=False, with_state=False, seed=3)
    g = torch.full_like(inputs["q"], -60.0)
    out = linear_attention(**inputs, g=g, scale=0.5, causal=True, backend=backend, chunk_size=16)
    want = 0.5 * (inputs["q"] * inputs["k"]).sum(-1, keepdim=True) * inputs["v"]
    assert torch.isfinite(out).all()
    assert rel_err(out, want.double()) < FP32_TOL


def test_gate_on_non_causal_call_is_refused():
    inputs = make_inputs(1, 1, 8, 4, 4, gated=True, normalize=False, with_state=False, seed=0)
    with pytest.raises(ValueError, match="causal"):
        linear_attention(**inputs, scale=1.0, causal=False, backend="torch")


@pytest.mark.parametrize("chunk_size, error", [(8, ValueError), (24, ValueError), (True, TypeError),
                                               ("16", TypeError)])
def test_bad_chunk_size_is_refused(chunk_size, error):
    inputs = make_inputs(1, 1, 8, 4, 4, gated=False, normalize=False, with_state=False, seed=0)
    with pytest.raises(error, match="chunk_size"):
        linear_attention(**inputs, scale=1.0, causal=True, backend="torch", chunk_size=chunk_size)


def test_state_of_wrong_shape_is_refused():
    inputs = make_inputs(1, 2, 8, 4, 4, gated=False, normalize=False, with_state=False, seed=0)
    with pytest.raises(ValueError, match=r"initial_state has shape \(1, 2, 4, 5\)"):
        linear_attention(**inputs, scale=1.0, causal=True, backend="torch", initial_state=torch.zeros(1, 2, 4, 5))
    with pytest.raises(TypeError, match="pair"):
        linear_attention(**inputs, scale=1.0, causal=True, backend="torch", normalize=True,
                         initial_state=torch.zeros(1, 2, 4, 4))


def test_linear_state_refuses_non_linear_methods():
    with pytest.raises(ValueError, match="dense"):
        linear_state("dense")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_inputs_equal_contiguous(backend):
    """(B, N, H, D) buffers seen through a transpose give the same result as contiguous copies."""
    gen = torch.Generator().manual_seed(11)
    q, k, g = (torch.randn(1, 21, 2, 16, generator=gen).transpose(1, 2) for _ in range(3))
    v = torch.randn(1, 21, 2, 8, generator=gen).transpose(1, 2)
    g = F.logsigmoid(g)
    assert not q.is_contiguous()
    kw = dict(scale=0.5, causal=True, backend=backend, chunk_size=16)
    strided = linear_attention(q, k, v, g=g, **kw)
    contiguous = linear_attention(q.contiguous(), k.contiguous(), v.contiguous(), g=g.contiguous(), **kw)
    assert torch.equal(strided, contiguous)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_fp32(backend, dtype):
    inputs = make_inputs(1, 2, 29, 16, 16, gated=True, normalize=False, with_state=False, seed=12)
    half = {name: x.to(dtype) for name, x in inputs.items()}
    out = linear_attention(**half, scale=0.25, causal=True, backend=backend, chunk_size=16)
    want, _, _ = recurrent_linear_attention(**{name: x.double() for name, x in half.items()}, scale=0.25)
    assert out.dtype == dtype
    rms = ((out.double() - want).square().mean() / want.square().mean()).sqrt().item()
    assert rms < (1e-2 if dtype == torch.bfloat16 else 2e-3)  # the output rounding dominates
