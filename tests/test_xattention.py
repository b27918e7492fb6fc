"""xattention: the antidiagonal estimator (Triton kernel and torch twin) against its float64
definition, the threshold selection on its own, and the method end to end."""

import pytest
import torch
from cuda_compile import compile_in_subprocess
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.block_mask import block_geometry
from attnzoo.kernels.scoring import antidiagonal_block_scores as triton_scores
from attnzoo.methods.xattention import forced_blocks, select_blocks, threshold_select
from attnzoo.reference import attention, expand_block_mask
from attnzoo.torch_impl.scoring import antidiagonal_block_scores as torch_scores

BACKENDS = st.sampled_from(["triton", "torch"])
SCORERS = {"triton": triton_scores, "torch": torch_scores}


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setenv("ATTNZOO_POISON", "1")


@st.composite
def problems(draw, max_batch: int = 2):
    kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return {"seed": draw(st.integers(0, 2**31 - 1)), "batch": draw(st.integers(1, max_batch)),
            "q_heads": kv_heads * group, "kv_heads": kv_heads, "n": draw(st.integers(1, 64)),
            "m": draw(st.integers(1, 64)),
            "d": draw(st.sampled_from([16, 32])), "block_q": draw(st.sampled_from([16, 32])),
            "block_k": draw(st.sampled_from([16, 32])), "stride": draw(st.sampled_from([1, 2, 4, 8, 16]))}


def _inputs(p, *, requires_grad=False):
    gen = torch.Generator().manual_seed(p["seed"])
    shapes = ((p["q_heads"], p["n"]), (p["kv_heads"], p["m"]), (p["kv_heads"], p["m"]))
    return [torch.randn(p["batch"], h, length, p["d"], generator=gen).requires_grad_(requires_grad)
            for h, length in shapes]


def _estimate_definition(q, k, *, stride, block_q, block_k, scale, causal):
    """float64: est[a, b] = scale / S * sum_t q[a*S + S-1-t] . k[b*S + t] (missing rows = 0), causal
    groups b with b*S > min(a*S + S-1, N-1) + M - N masked, softmax over b, summed per block."""
    S = stride
    (B, Hq, N, D), (Hk, M) = q.shape, k.shape[1:3]
    n_groups, m_groups = -(-N // S), -(-M // S)
    q_pad = torch.zeros(B, Hq, n_groups * S, D, dtype=torch.float64)
    k_pad = torch.zeros(B, Hq, m_groups * S, D, dtype=torch.float64)
    q_pad[:, :, :N] = q.double()
    k_pad[:, :, :M] = k.double().repeat_interleave(Hq // Hk, dim=1)
    est = sum(q_pad[:, :, S - 1 - t::S] @ k_pad[:, :, t::S].transpose(-1, -2) for t in range(S)) * scale / S
    a = torch.arange(n_groups)[:, None]
    b = torch.arange(m_groups)[None, :]
    keep = torch.ones(n_groups, m_groups, dtype=torch.bool)
    if causal:
        keep = b * S <= torch.clamp(a * S + S - 1, max=N - 1) + M - N
    probs = torch.softmax(est.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    per_key_block = torch.zeros(B, Hq, n_groups, -(-M // block_k), dtype=torch.float64)
    per_key_block.index_add_(3, (b[0] * S) // block_k, probs)
    scores = torch.zeros(B, Hq, -(-N // block_q), per_key_block.shape[3], dtype=torch.float64)
    scores.index_add_(2, (a[:, 0] * S) // block_q, per_key_block)
    return scores


@given(p=problems(), causal=st.booleans(), backend=BACKENDS, scale=st.floats(0.05, 1.0),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), chunked=st.booleans())
@settings()
def test_estimator_equals_its_float64_definition(p, causal, backend, scale, dtype, chunked):
    """Low-precision inputs too (their products are exact in the fp32 accumulator), and the kernel's
    split of the stride over several dots (as on GPUs) as well as one dot (as under the interpreter)."""
    q, k = (x.to(dtype) for x in _inputs(p)[:2])
    S, bq, bk = p["stride"], p["block_q"], p["block_k"]
    chunk = {"t_chunk": max(1, S // 4)} if backend == "triton" and chunked else {}
    got = SCORERS[backend](q, k, stride=S, block_q=bq, block_k=bk, scale=scale, causal=causal, **chunk)
    want = _estimate_definition(q, k, stride=S, block_q=bq, block_k=bk, scale=scale, causal=causal)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    full_rows = (torch.arange(got.shape[2]) + 1) * bq <= p["n"]  # query blocks with no padded group
    if not causal:
        torch.testing.assert_close(got.sum(-1)[..., full_rows], torch.full_like(got.sum(-1)[..., full_rows], bq / S))


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 100), m=st.integers(1, 100),
       block=st.sampled_from([16, 32]), causal=st.booleans(), low=st.floats(0, 1), high=st.floats(0, 1.2))
@settings()
def test_threshold_selection(seed, n, m, block, causal, low, high):
    """Forced blocks always; threshold 0 = only them; >= 1 = every admissible block; masks nest as the
    threshold grows; the kept mass reaches threshold * row total."""
    admissible, _ = block_geometry(n, m, block, block, causal=causal)
    forced = forced_blocks(n, m, block, block, causal=causal)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 3, *admissible.shape, generator=gen) ** 3 * admissible
    low, high = min(low, high), max(low, high)
    keep_low, keep_high = (threshold_select(scores, t, forced, admissible) for t in (low, high))
    assert not (keep_low & ~keep_high).any()  # nested
    assert not (keep_high & ~admissible).any()
    assert torch.equal(keep_low & forced, forced.expand_as(keep_low))
    kept_mass = (scores * keep_low).sum(-1)
    assert (kept_mass >= low * scores.sum(-1) - 1e-6).all()
    assert torch.equal(threshold_select(scores, 0.0, forced, admissible), forced.expand_as(scores))
    assert torch.equal(threshold_select(scores, 1.0, forced, admissible), admissible.expand_as(scores))
    if causal:  # every query block that sees a key keeps its diagonal block
        assert torch.equal(keep_low.any(-1), admissible.any(-1).expand(2, 3, -1))


@given(p=problems(max_batch=1), causal=st.booleans(), backend=BACKENDS, threshold=st.floats(0, 0.95))
@settings()
def test_output_equals_the_masked_reference_and_skips_unselected_values(p, causal, backend, threshold):
    """The returned mask is the estimator's selection; the output equals the float64 reference masked
    with it; on the kernel backend, NaN in V of key blocks no head of the kv group selected is unread."""
    q, k, v = _inputs(p)
    kwargs = {"stride": p["stride"], "threshold": threshold, "block_size": (p["block_q"], p["block_k"])}
    expected_mask = select_blocks(q, k, stride=p["stride"], threshold=threshold, block_q=p["block_q"],
                                  block_k=p["block_k"], scale=p["d"] ** -0.5, causal=causal, backend=backend)
    blocks = expected_mask.to_dense()
    if backend == "triton":
        unread = ~blocks.unflatten(1, (p["kv_heads"], -1)).any(2).any(2)  # (B, Hk, nKB)
        v_used = v.masked_fill(expand_block_mask(unread[:, :, None], 1, p["m"], 1, p["block_k"])[:, :, 0, :, None],
                               float("nan"))
    else:
        v_used = v
    out, returned = attnzoo.get("xattention", **kwargs)(q, k, v_used, causal=causal, backend=backend,
                                                        return_block_mask=True)
    assert torch.equal(returned.to_dense(), blocks)
    mask = expand_block_mask(blocks, p["n"], p["m"], p["block_q"], p["block_k"])
    torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double(), causal=causal, mask=mask),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [False, True])
def test_threshold_one_equals_dense(backend, causal):
    p = {"seed": 11, "batch": 1, "q_heads": 2, "kv_heads": 1, "n": 40, "m": 56, "d": 16, "block_q": 16, "block_k": 16,
         "stride": 4}
    q, k, v = _inputs(p)
    out = attnzoo.get("xattention", threshold=1.0, stride=4, block_size=16)(q, k, v, causal=causal, backend=backend)
    torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double(), causal=causal),
                               rtol=1e-5, atol=1e-5)


@given(p=problems(max_batch=1), causal=st.booleans(), threshold=st.floats(0, 0.95))
@settings()
def test_gradients_equal_the_masked_reference(p, causal, threshold):
    """The selection is piecewise constant in q, k: gradients are those of attention under the mask."""
    q, k, v = _inputs(p, requires_grad=True)
    out, block_mask = attnzoo.get("xattention", stride=p["stride"], threshold=threshold,
                                  block_size=(p["block_q"], p["block_k"]))(
        q, k, v, causal=causal, backend="torch", return_block_mask=True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(p["seed"] + 1))
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    mask = expand_block_mask(block_mask.to_dense(), p["n"], p["m"], p["block_q"], p["block_k"])
    want = torch.autograd.grad(attention(q64, k64, v64, causal=causal, mask=mask), (q64, k64, v64),
                               grad_out.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


def test_estimator_kernel_compiles_for_sm90():
    """The interpreter accepts code the GPU compiler rejects: compile one real variant (bf16, stride 8
    in dots of 2 positions, head dim 128, causal) for sm_90 in a child process."""
    meta = {"STRIDE": 8, "T_CHUNK": 2, "GROUPS_Q": 16, "GROUPS_K": 16, "TILE_A": 16, "TILE_B": 16, "BLOCK_D": 128,
            "CAUSAL": True, "PRECISION": "tf32"}
    job = {"kernel": "attnzoo.kernels.scoring:_antidiagonal_kernel", "pointers": {"Q": "*bf16", "K": "*bf16",
           "OUT": "*fp32"}, "floats": ["est_scale_log2"], "constexprs": meta, "arch": 90, "num_warps": 4}
    result = compile_in_subprocess([job])
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.startswith("ok "), result.stdout


@pytest.mark.parametrize("params, match", [
    ({"stride": 3}, "power of two"),
    ({"stride": 0}, "power of two"),
    ({"stride": 64, "block_size": 32}, "divide the block size"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"block_size": 48}, "powers of two"),
])
def test_bad_parameters_are_rejected(params, match):
    q = k = v = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match=match):
        attnzoo.get("xattention", **params)(q, k, v, backend="torch")
