"""dense(..., bias=, sinks=): an additive bias read tile by tile and per-head attention sinks, on the
Triton kernel (interpreter) and the torch twin, against a float64 oracle written out here: outputs,
lse and the gradients of q, k, v, the bias (summed over its broadcast dimensions) and the sinks."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnzoo

BACKENDS = ["triton", "torch"]


def _oracle(q, k, v, *, scale, causal, window, bias, sinks):
    """float64 softmax attention, the sink as one extra column of scores whose value is zero."""
    B, Hq, N, _ = q.shape
    Hk, M = k.shape[1], k.shape[2]
    k, v = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if bias is not None:
        scores = scores + bias
    i = torch.arange(N)[:, None] + (M - N)  # query i sits at key position i + M - N
    j = torch.arange(M)[None, :]
    left, right = window
    right = 0 if causal else right
    seen = torch.ones(N, M, dtype=torch.bool)
    if right >= 0:
        seen &= j <= i + right
    if left >= 0:
        seen &= j >= i - left
    scores = scores.masked_fill(~seen, -math.inf)
    if sinks is not None:
        scores = torch.cat([scores, sinks[None, :, None, None].expand(B, Hq, N, 1)], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.nan_to_num(torch.exp(scores - lse[..., None]))[..., :M]
    return probs @ v, lse


bias_shapes = st.sampled_from(["full", "per_head", "keys_only", "t5", "none"])


def _bias_shape(kind, B, Hq, N, M):
    return {"full": (B, Hq, N, M), "per_head": (Hq, N, M), "keys_only": (B, 1, 1, M), "t5": (1, Hq, N, M),
            "none": None}[kind]


@pytest.mark.parametrize("backend", BACKENDS)
@given(B=st.integers(1, 2), Hk=st.integers(1, 2), group=st.sampled_from([1, 2]), N=st.integers(1, 24),
       M=st.integers(1, 24), causal=st.booleans(), window=st.tuples(st.integers(-1, 9), st.integers(-1, 9)),
       bias_kind=bias_shapes, with_sinks=st.booleans(), seed=st.integers(0, 2**16))
def test_bias_and_sinks_match_float64_oracle(backend, B, Hk, group, N, M, causal, window, bias_kind, with_sinks,
                                              seed):
    Hq, D = Hk * group, 16
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, h, n, D, generator=gen) for h, n in ((Hq, N), (Hk, M), (Hk, M)))
    shape = _bias_shape(bias_kind, B, Hq, N, M)
    bias = None if shape is None else torch.randn(shape, generator=gen) * 2
    sinks = torch.randn(Hq, generator=gen) if with_sinks else None
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    extras = {name: t.clone().requires_grad_() for name, t in (("bias", bias), ("sinks", sinks)) if t is not None}
    out, lse = attnzoo.get("dense", window_size=window, return_lse=True)(*leaves, causal=causal, backend=backend,
                                                                         **extras)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_extras = {name: t.double().requires_grad_() for name, t in (("bias", bias), ("sinks", sinks))
                  if t is not None}
    ref_out, ref_lse = _oracle(*ref_leaves, scale=D ** -0.5, causal=causal, window=window,
                               bias=ref_extras.get("bias"), sinks=ref_extras.get("sinks"))
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], rtol=1e-5, atol=1e-5)

    d_out = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad((out * d_out).sum(), [*leaves, *extras.values()])
    ref_grads = torch.autograd.grad((ref_out * d_out.double()).sum(), [*ref_leaves, *ref_extras.values()])
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_sparse_op_takes_a_bias_too(backend):
    """The bias rides the same tiles on sparse calls: listed blocks get it, unlisted ones are never read."""
    from attnzoo import masks
    from attnzoo.ops.flash import flash_attention

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 48, 16, generator=gen) for _ in range(3))
    bias = torch.randn(1, 2, 48, 48, generator=gen)
    block_mask = masks.random(48, 48, 0.5, 16, heads=2, seed=3, causal=True)
    out, _ = flash_attention(q, k, v, scale=0.25, causal=True, block_mask=block_mask, bias=bias, backend=backend)
    keep = block_mask.to_dense().repeat_interleave(16, -2).repeat_interleave(16, -1)[..., :48, :48]
    ref, _ = _oracle(q.double(), k.double(), v.double(), scale=0.25, causal=True, window=(-1, -1),
                     bias=bias.double().masked_fill(~keep, -math.inf), sinks=None)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_a_row_that_sees_no_key_gives_its_mass_to_the_sink():
    """With a sink, a fully masked row outputs 0 and its lse is the sink logit (gpt-oss semantics)."""
    q, k, v = torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16), torch.randn(1, 2, 3, 16)
    out, lse = attnzoo.get("dense", window_size=(0, -1), return_lse=True)(
        q, k, v, causal=True, sinks=torch.tensor([0.5, -1.0]), bias=torch.full((3, 3), -math.inf), backend="torch")
    assert torch.equal(out, torch.zeros_like(out))
    torch.testing.assert_close(lse, torch.tensor([0.5, -1.0])[None, :, None].expand(1, 2, 3))


@pytest.mark.parametrize("bad, message", [
    (dict(bias=torch.zeros(2, 3, 5)), "broadcastable to"),
    (dict(bias=torch.zeros(5, 7, dtype=torch.float64)), "dtype"),
    (dict(bias=torch.full((5, 7), math.nan)), "NaN"),
    (dict(bias=[[0.0]]), "torch.Tensor"),
    (dict(sinks=torch.zeros(3)), r"\(Hq,\) = \(2,\)"),
    (dict(sinks=torch.tensor([0.0, math.inf])), "finite"),
])
def test_bad_bias_or_sinks_are_refused_by_name(bad, message):
    q, k, v = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16), torch.randn(1, 2, 7, 16)
    with pytest.raises((TypeError, ValueError), match=message):
        attnzoo.get("dense")(q, k, v, **bad)
