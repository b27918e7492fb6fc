"""dense: the FlashAttention-2 kernel (Triton, under the interpreter on CPU) and its torch twin
against the float64 reference: outputs, lse, gradients, empty rows, lse merge, dtypes, strides."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnzoo
from attnzoo import reference

BACKENDS = ["triton", "torch"]
FP32_TOL = dict(rtol=1e-5, atol=1e-5)


def _inputs(seed, B, Hq, Hk, N, M, D, Dv, dtype=torch.float32, seq_major=False, device="cpu"):
    """Random q, k, v; with `seq_major` they are (B, N, H, D) buffers seen through a transpose, the
    non-contiguous layout HuggingFace models hand over."""
    gen = torch.Generator().manual_seed(seed)

    def make(h, n, d):
        if seq_major:
            return torch.randn(B, n, h, d, generator=gen).transpose(1, 2).to(device=device, dtype=dtype)
        return torch.randn(B, h, n, d, generator=gen).to(device=device, dtype=dtype)

    return make(Hq, N, D), make(Hk, M, D), make(Hk, M, Dv)


def _run_with_grads(fn, q, k, v, seed, **kwargs):
    """Forward with lse, then backward of a random linear function of (out, lse)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v, return_lse=True, **kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    d_out = torch.randn(out.shape, generator=gen).to(out)
    d_lse = torch.randn(lse.shape, generator=gen).to(lse)
    loss = (out * d_out).sum() + (torch.where(torch.isfinite(lse), lse, 0.0) * d_lse).sum()
    loss.backward()
    return out, lse, (q.grad, k.grad, v.grad)


def _reference_with_grads(q, k, v, seed, **kwargs):
    return _run_with_grads(lambda *a, **kw: reference.attention(*a, **kw), q.double(), k.double(), v.double(),
                           seed, **kwargs)


shapes = st.fixed_dictionaries({
    "B": st.integers(1, 2),
    "Hk": st.integers(1, 2),
    "group": st.sampled_from([1, 2, 3]),
    "N": st.integers(1, 40),
    "M": st.integers(1, 40),
    "D": st.sampled_from([16, 32, 80]),
    "Dv": st.sampled_from([16, 24]),
})


@pytest.mark.parametrize("backend", BACKENDS)
@given(shape=shapes, causal=st.booleans(), window=st.tuples(st.integers(-1, 9), st.integers(-1, 9)),
       softcap=st.sampled_from([0.0, 0.0, 2.5]), seq_major=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_matches_float64_reference(backend, shape, causal, window, softcap, seq_major, seed):
    s = shape
    q, k, v = _inputs(seed, s["B"], s["Hk"] * s["group"], s["Hk"], s["N"], s["M"], s["D"], s["Dv"],
                      seq_major=seq_major)
    kwargs = dict(causal=causal, window_size=window, softcap=softcap)
    out, lse, grads = _run_with_grads(attnzoo.get("dense"), q, k, v, seed, backend=backend, **kwargs)
    ref_out, ref_lse, ref_grads = _reference_with_grads(q, k, v, seed, **kwargs)

    torch.testing.assert_close(out.double(), ref_out, **FP32_TOL)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    visible = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse.double()[visible], ref_lse[visible], **FP32_TOL)
    for name, got, want in zip("qkv", grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-5, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_no_key_are_zero_with_zero_gradients(backend):
    # causal with N > M: query i sees keys j <= i - (N - M), so the first N - M rows see nothing;
    # a left window of 2 also empties rows in the middle of a sliding window.
    q, k, v = _inputs(7, 1, 2, 1, 21, 6, 16, 16)
    out, lse, (dq, dk, dv) = _run_with_grads(attnzoo.get("dense"), q, k, v, 3, causal=True, backend=backend)
    empty = slice(0, 15)
    assert torch.isfinite(out).all() and torch.isfinite(dq).all() and torch.isfinite(dk).all()
    assert (out[:, :, empty] == 0).all() and (dq[:, :, empty] == 0).all()
    assert torch.isneginf(lse[:, :, empty]).all() and torch.isfinite(lse[:, :, 15:]).all()
    ref_out, _, ref_grads = _reference_with_grads(q, k, v, 3, causal=True)
    torch.testing.assert_close(out.double(), ref_out, **FP32_TOL)
    torch.testing.assert_close(dk.double(), ref_grads[1], rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@given(N=st.integers(1, 33), M=st.integers(2, 40), split=st.floats(0.1, 0.9), seed=st.integers(0, 2**31 - 1))
def test_lse_merge_of_two_key_halves_equals_whole(backend, N, M, split, seed):
    q, k, v = _inputs(seed, 1, 2, 2, N, M, 16, 16)
    cut = max(1, min(M - 1, int(M * split)))
    fn = attnzoo.get("dense", return_lse=True)
    whole, lse = fn(q, k, v, backend=backend)
    first, lse1 = fn(q, k[:, :, :cut], v[:, :, :cut], backend=backend)
    second, lse2 = fn(q, k[:, :, cut:], v[:, :, cut:], backend=backend)
    merged_lse = torch.logaddexp(lse1, lse2)
    merged = (torch.exp(lse1 - merged_lse)[..., None] * first + torch.exp(lse2 - merged_lse)[..., None] * second)
    torch.testing.assert_close(merged_lse, lse, **FP32_TOL)
    torch.testing.assert_close(merged, whole, **FP32_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision_close_to_float64(backend, dtype, tol):
    q, k, v = _inputs(11, 2, 4, 2, 37, 29, 32, 32, dtype=dtype)
    out, lse, grads = _run_with_grads(attnzoo.get("dense"), q, k, v, 5, causal=True, backend=backend)
    ref_out, ref_lse, ref_grads = _reference_with_grads(q, k, v, 5, causal=True)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=4 * tol, atol=4 * tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mqa_single_query_decoding_step(backend):
    # one new token (N = 1) against a cache of 50 keys, 8 query heads sharing one kv head
    q, k, v = _inputs(13, 2, 8, 1, 1, 50, 16, 16)
    out = attnzoo.get("dense")(q, k, v, causal=True, backend=backend)
    torch.testing.assert_close(out.double(), reference.attention(q.double(), k.double(), v.double(), causal=True),
                               **FP32_TOL)


def test_torch_backend_handles_long_sequences_in_chunks():
    # 3000 x 3000 scores would be 36 MB per head in fp32; the chunked path only holds 3000 x 512 at a time.
    q, k, v = _inputs(17, 1, 1, 1, 3000, 3000, 16, 16)
    out = attnzoo.get("dense")(q, k, v, causal=True, backend="torch")
    rows = torch.tensor([0, 1, 511, 512, 1999, 2999])
    ref = reference.attention(q[:, :, rows].double(), k.double(), v.double(),
                              mask=reference.visible_mask(3000, 3000, causal=True)[rows])
    torch.testing.assert_close(out[:, :, rows].double(), ref, **FP32_TOL)


def test_offsets_past_2_31_elements():
    # Three batch entries 2^30 + 64 elements apart: each stride fits in int32, but the offset of the
    # third entry does not, so the kernel must form offsets in 64 bits. The buffer is virtual memory;
    # only the pages holding the three slices are touched.
    B, N, D = 3, 20, 16
    stride_b = 2**30 + 64
    try:
        buf = torch.empty((B - 1) * stride_b + N * D, dtype=torch.float16)
    except RuntimeError:
        pytest.skip("cannot reserve 4 GiB of virtual memory here")
    q = buf.as_strided((B, 1, N, D), (stride_b, N * D, D, 1))
    gen = torch.Generator().manual_seed(19)
    for b in range(B):
        q[b].copy_(torch.randn(1, N, D, generator=gen))
    k = torch.randn(B, 1, N, D, generator=gen).half()
    v = torch.randn(B, 1, N, D, generator=gen).half()
    out = attnzoo.get("dense")(q, k, v, causal=True, backend="triton")
    ref = reference.attention(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-3)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v = _inputs(23, 1, 2, 2, 9, 9, 32, 16)
    default = attnzoo.get("dense")(q, k, v)
    explicit = attnzoo.get("dense")(q, k, v, scale=1 / math.sqrt(32))
    other = attnzoo.get("dense")(q, k, v, scale=0.5)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    assert not torch.allclose(default, other)
    torch.testing.assert_close(other.double(), reference.attention(q.double(), k.double(), v.double(), scale=0.5),
                               **FP32_TOL)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("D", [64, 128, 80])
def test_cuda_bf16_large(causal, D):
    q, k, v = _inputs(29, 2, 8, 2, 1537, 2049, D, D, dtype=torch.bfloat16, device="cuda")
    out, lse, grads = _run_with_grads(attnzoo.get("dense"), q, k, v, 31, causal=causal)
    ref_out, _, ref_grads = _reference_with_grads(q, k, v, 31, causal=causal)
    torch.testing.assert_close(out.double(), ref_out, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want, rtol=5e-2, atol=5e-2)
