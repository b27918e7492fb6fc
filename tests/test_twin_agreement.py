"""The torch twin and the Triton kernels (under the interpreter) agree on every sparse and windowed case:
the same block choice, outputs within 1e-6 relative RMS in fp32, gradients within 1e-5.

Both backends receive the same call; nothing here is computed by attnzoo's own helpers.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnzoo
from attnzoo import masks

BLOCK = 16


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-30)).item()


def _joint(grads) -> torch.Tensor:
    """dq, dk, dv as one vector: compared jointly, so that a gradient that is 0 in exact arithmetic (dq
    of a row with a single key: fp32 rounding noise on both backends) is measured against the scale
    of the others, not against itself."""
    return torch.cat([g.flatten() for g in grads])


@st.composite
def _shapes(draw, *, equal_lengths=False, gqa=True):
    group = draw(st.sampled_from([1, 2])) if gqa else 1
    kv_heads = draw(st.sampled_from([1, 2]))
    n = draw(st.integers(1, 70))
    m = n if equal_lengths else draw(st.integers(1, 70))
    return dict(batch=draw(st.integers(1, 2)), heads=kv_heads * group, kv_heads=kv_heads, n=n, m=m,
                seed=draw(st.integers(0, 2**16)))


def _qkv(shape, *, grad: bool):
    g = torch.Generator().manual_seed(shape["seed"])
    q = torch.randn(shape["batch"], shape["heads"], shape["n"], 16, generator=g)
    k = torch.randn(shape["batch"], shape["kv_heads"], shape["m"], 16, generator=g)
    v = torch.randn(shape["batch"], shape["kv_heads"], shape["m"], 16, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _both(method, shape, *, backward: bool, **kwargs):
    """(out, mask, grads) of the same call on each backend."""
    results = []
    for backend in ("triton", "torch"):
        q, k, v = _qkv(shape, grad=backward)
        out = method(q, k, v, backend=backend, **kwargs)
        out, mask = out if isinstance(out, tuple) else (out, None)
        grads = None
        if backward:
            grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out).mul_(0.5))
        results.append((out.detach(), mask, grads))
    return results


def _check(results, *, grads: bool):
    (out_t, mask_t, grad_t), (out_p, mask_p, grad_p) = results
    if mask_t is not None:
        assert torch.equal(mask_t.to_dense(), mask_p.to_dense()), "the backends chose different blocks"
    assert _rel_rms(out_p, out_t) <= 1e-6
    if grads:
        assert _rel_rms(_joint(grad_p), _joint(grad_t)) <= 1e-5


@given(shape=_shapes(), causal=st.booleans(), density=st.sampled_from([0.3, 0.7]), per_head=st.booleans())
def test_block_sparse_backends_agree(shape, causal, density, per_head):
    mask = masks.random(shape["n"], shape["m"], density, BLOCK, batch=shape["batch"],
                        heads=shape["heads"] if per_head else 1, seed=shape["seed"], causal=causal)
    _check(_both(attnzoo.get("block_sparse"), shape, backward=True, causal=causal, block_mask=mask,
                 return_block_mask=True), grads=True)


@given(shape=_shapes(), causal=st.booleans(), threshold=st.sampled_from([0.5, 0.9]))
def test_xattention_backends_agree(shape, causal, threshold):
    method = attnzoo.get("xattention", block_size=BLOCK, stride=4, threshold=threshold)
    _check(_both(method, shape, backward=True, causal=causal, return_block_mask=True), grads=True)


@given(shape=_shapes(), causal=st.booleans(), topk=st.sampled_from([0.3, 0.6]))
def test_seerattention_oracle_backends_agree(shape, causal, topk):
    method = attnzoo.get("seerattention", block_size=BLOCK, topk_ratio=topk, threshold=None)
    _check(_both(method, shape, backward=True, causal=causal, return_block_mask=True), grads=True)


@given(shape=_shapes(), causal=st.booleans())
def test_s2_backends_agree(shape, causal):
    method = attnzoo.get("s2", block_size=BLOCK, local_blocks=1, vert_stride=2)
    _check(_both(method, shape, backward=True, causal=causal, return_block_mask=True), grads=True)


@given(shape=_shapes(), select=st.sampled_from([0.2, 0.5]))
def test_sparsed_backends_agree(shape, select):
    method = attnzoo.get("sparsed", block_size=BLOCK, select=select)
    _check(_both(method, shape, backward=True, causal=False, return_block_mask=True), grads=True)


@given(shape=_shapes(), causal=st.booleans(), left=st.integers(-1, 20), right=st.integers(-1, 20),
       softcap=st.sampled_from([0.0, 5.0]))
def test_dense_windows_and_softcap_backends_agree(shape, causal, left, right, softcap):
    method = attnzoo.get("dense", window_size=(left, right), softcap=softcap, return_lse=True)
    results = []
    for backend in ("triton", "torch"):
        q, k, v = _qkv(shape, grad=True)
        out, lse = method(q, k, v, causal=causal, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out).mul_(0.5))
        results.append((out.detach(), lse.detach(), grads))
    (out_t, lse_t, grad_t), (out_p, lse_p, grad_p) = results
    assert torch.equal(torch.isinf(lse_t), torch.isinf(lse_p))
    assert _rel_rms(out_p, out_t) <= 1e-6
    finite = torch.isfinite(lse_t)
    if finite.any():
        assert _rel_rms(lse_p[finite], lse_t[finite]) <= 1e-6
    assert _rel_rms(_joint(grad_p), _joint(grad_t)) <= 1e-5


@pytest.mark.parametrize("causal", [False, True])
def test_plain_dense_on_torch_runs_sdpa_and_matches_the_kernel(causal):
    """A plain dense call on the torch backend is SDPA's (exact for it); it equals the kernel's."""
    from attnzoo.ops.flash import flash_path

    assert flash_path("torch", n=33, m=33, window=(-1, 0 if causal else -1), softcap=0.0, sparse=False,
                      need_lse=False) == "sdpa"
    assert flash_path("torch", n=33, m=40, window=(-1, 0), softcap=0.0, sparse=False, need_lse=False) == "twin"
    shape = dict(batch=2, heads=4, kv_heads=2, n=33, m=33, seed=3)
    _check(_both(attnzoo.get("dense"), shape, backward=True, causal=causal), grads=True)


@given(shape=_shapes(), causal=st.booleans(), value_dim=st.sampled_from([16, 24]), through_lse=st.booleans())
def test_sparse_op_with_other_value_dim_and_lse_gradient_backends_agree(shape, causal, value_dim, through_lse):
    """The twin's pieces run in torch's fused CPU kernel only when D == Dv and no gradient reaches the
    lse; the other cases take its written-out path. Both agree with the kernel, gradients included."""
    from attnzoo.ops.flash import flash_attention

    mask = masks.random(shape["n"], shape["m"], 0.6, BLOCK, heads=shape["heads"], seed=shape["seed"], causal=causal)
    results = []
    for backend in ("triton", "torch"):
        q, k, v = _qkv(shape, grad=True)
        v = torch.cat([v, v[..., : value_dim - 16] * 2], dim=-1).detach().requires_grad_()
        out, lse = flash_attention(q, k, v, scale=0.25, causal=causal, block_mask=mask, backend=backend)
        loss = out.sum() * 0.5 + (torch.nan_to_num(lse, neginf=0.0).sum() if through_lse else 0)
        results.append((out.detach(), None, torch.autograd.grad(loss, (q, k, v))))
    _check(results, grads=True)
