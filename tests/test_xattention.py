"""xattention: the antidiagonal estimator (Triton kernel and torch twin) against its float64
definition (attnzoo.reference.xattention), the threshold selection against the rule written out, the
forced blocks stated literally (key block 0 in every row, the diagonal block for causal), and the
method end to end."""

import pytest
import torch
from cuda_compile import compile_in_subprocess
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.kernels.scoring import antidiagonal_block_scores as triton_scores
from attnzoo.methods.xattention import threshold_select
from attnzoo.reference import attention, expand_block_mask, visible_mask
from attnzoo.reference import xattention as oracle
from attnzoo.reference.blocks import admissible_blocks
from attnzoo.torch_impl.scoring import antidiagonal_block_scores as torch_scores
from pictures import draw, picture

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
    want = oracle.antidiagonal_estimate(q, k, stride=S, block_q=bq, block_k=bk, scale=scale, causal=causal)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    full_rows = (torch.arange(got.shape[2]) + 1) * bq <= p["n"]  # query blocks with no padded group
    if not causal:  # each of a full query block's bq / S groups spreads probability 1 over the key groups
        torch.testing.assert_close(got.sum(-1)[..., full_rows], torch.full_like(got.sum(-1)[..., full_rows], bq / S))


def test_threshold_selection_by_hand():
    """One non-causal row of scores 1, 4, 2, 3 (total 10), key block 0 forced: blocks are taken in
    descending score while the mass kept is below threshold * 10, so the crossing block is kept."""
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    forced, admissible = picture("#..."), picture("####")
    for threshold, want in [(0.0, "#..."), (0.05, "#..."), (0.11, "##.."), (0.5, "##.."), (0.55, "##.#"),
                            (0.8, "##.#"), (0.85, "####"), (1.0, "####")]:
        got = threshold_select(scores, threshold, forced, admissible)
        assert torch.equal(got, picture(want)), (threshold, draw(got))
    ties = torch.tensor([[1.0, 2.0, 2.0, 2.0]])  # equal scores: the lower key block first
    assert torch.equal(threshold_select(ties, 0.4, forced, admissible), picture("##.."))
    assert torch.equal(threshold_select(ties, 0.6, forced, admissible), picture("###."))


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 100), m=st.integers(1, 100),
       block=st.sampled_from([16, 32]), causal=st.booleans(), sixteenths=st.integers(0, 17))
@settings()
def test_threshold_selection_follows_the_rule(seed, n, m, block, causal, sixteenths):
    """Against the rule written out (attnzoo.reference.xattention.threshold_select) on scores in
    multiples of 1/64 and thresholds in multiples of 1/16, where fp32 sums are exact, so ties (lower
    index first) and exact crossings are decided alike; plus the rule's consequences stated directly."""
    admissible = admissible_blocks(n, m, block, block, causal=causal)
    forced = oracle.forced_blocks(n, m, block, block, causal=causal)
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 64, (2, 3, *admissible.shape), generator=gen).float() / 64 * admissible
    threshold = sixteenths / 16
    keep = threshold_select(scores, threshold, forced, admissible)
    assert torch.equal(keep, oracle.threshold_select(scores, threshold, forced, admissible))
    assert not (keep & ~admissible).any() and torch.equal(keep & forced, forced.expand_as(keep))
    total = (scores * admissible).sum(-1)
    assert ((scores * keep).sum(-1) >= torch.clamp(torch.tensor(threshold), max=1) * total).all()
    if threshold >= 1:
        assert torch.equal(keep, admissible.expand_as(keep))
    if threshold == 0:
        assert torch.equal(keep, forced.expand_as(keep))
    larger = threshold_select(scores, threshold + 1 / 16, forced, admissible)
    assert not (keep & ~larger).any()  # masks nest as the threshold grows


def _forced_by_the_paper(n, m, block_q, block_k, causal):
    """Key block 0 in every row whose queries see key 0; for causal also the diagonal block, the key
    block holding the diagonal key (last query + M - N) of the block's last query, if that key exists."""
    sees = visible_mask(n, m, causal=causal)
    n_qb, n_kb = -(-n // block_q), -(-m // block_k)
    rows = []
    for i in range(n_qb):
        row = torch.zeros(n_kb, dtype=torch.bool)
        row[0] = bool(sees[i * block_q:(i + 1) * block_q, 0].any())
        last = min((i + 1) * block_q, n) - 1
        if causal and last + m - n >= 0:
            row[(last + m - n) // block_k] = True
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal, n, m, blocks", [
    (False, 64, 64, "#...\n#...\n#...\n#..."),
    (True, 64, 64, "#...\n##..\n#.#.\n#..#"),
    (True, 32, 64, "#.#.\n#..#"),      # queries sit at i + 32: block 0 ends at key 47, block 1 at 63
    (True, 64, 32, "..\n..\n#.\n##"),  # the first 32 queries see no key
], ids=["non-causal", "causal", "causal-N<M", "causal-N>M"])
def test_threshold_zero_keeps_key_block_zero_and_the_diagonal_block(backend, causal, n, m, blocks):
    gen = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 2, n, 16, generator=gen), torch.randn(1, 1, m, 16, generator=gen), \
        torch.randn(1, 1, m, 16, generator=gen)
    _, block_mask = attnzoo.get("xattention", threshold=0.0, stride=4, block_size=16)(
        q, k, v, causal=causal, backend=backend, return_block_mask=True)
    for head in range(2):
        got = block_mask.to_dense()[0, head]
        assert torch.equal(got, picture(blocks)), draw(got)


@given(p=problems(max_batch=1), causal=st.booleans(), backend=BACKENDS)
@settings()
def test_threshold_zero_keeps_exactly_the_forced_blocks(p, causal, backend):
    q, k, v = _inputs(p)
    _, block_mask = attnzoo.get("xattention", threshold=0.0, stride=p["stride"],
                                block_size=(p["block_q"], p["block_k"]))(q, k, v, causal=causal, backend=backend,
                                                                         return_block_mask=True)
    want = _forced_by_the_paper(p["n"], p["m"], p["block_q"], p["block_k"], causal)
    assert torch.equal(block_mask.to_dense(), want.expand(p["batch"], p["q_heads"], -1, -1))


@given(p=problems(max_batch=1), causal=st.booleans(), backend=BACKENDS, threshold=st.floats(0, 0.95))
@settings()
def test_output_equals_the_masked_reference_and_skips_unselected_values(p, causal, backend, threshold):
    """The returned mask is the selection of the float64 estimate (in every row where the float64
    choice is not within rounding of another one; there, it still keeps the forced blocks and
    nothing inadmissible); the output equals the float64 reference masked with it; on the kernel
    backend, NaN in V of key blocks no head of the kv group selected is unread."""
    q, k, v = _inputs(p)
    bq, bk = p["block_q"], p["block_k"]
    kwargs = {"stride": p["stride"], "threshold": threshold, "block_size": (bq, bk)}
    _, chosen = attnzoo.get("xattention", **kwargs)(q, k, v, causal=causal, backend=backend, return_block_mask=True)
    blocks = chosen.to_dense()
    want, margin = oracle.select_blocks(q, k, stride=p["stride"], threshold=threshold, block_q=bq, block_k=bk,
                                        scale=p["d"] ** -0.5, causal=causal, return_margin=True)
    robust = margin > 1e-4
    assert torch.equal(blocks[robust], want[robust])
    forced = oracle.forced_blocks(p["n"], p["m"], bq, bk, causal=causal)
    assert torch.equal(blocks & forced, forced.expand_as(blocks))
    assert not (blocks & ~admissible_blocks(p["n"], p["m"], bq, bk, causal=causal)).any()

    if backend == "triton":
        unread = ~blocks.unflatten(1, (p["kv_heads"], -1)).any(2).any(2)  # (B, Hk, nKB)
        v_used = v.masked_fill(expand_block_mask(unread[:, :, None], 1, p["m"], 1, bk)[:, :, 0, :, None],
                               float("nan"))
    else:
        v_used = v
    out, returned = attnzoo.get("xattention", **kwargs)(q, k, v_used, causal=causal, backend=backend,
                                                        return_block_mask=True)
    assert torch.equal(returned.to_dense(), blocks)
    mask = expand_block_mask(blocks, p["n"], p["m"], bq, bk)
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


def test_threshold_one_keeps_every_admissible_block_even_one_scoring_zero():
    """threshold >= 1 keeps every admissible block, also those whose estimate underflowed to 0 (a
    peaked row): the forced blocks already hold the whole mass, and the rest are kept all the same."""
    scores = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(4, 4)
    admissible = torch.ones(4, 4, dtype=torch.bool).tril()
    forced = torch.eye(4, dtype=torch.bool) | (torch.arange(4) == 0)
    assert torch.equal(threshold_select(scores, 1.0, forced & admissible, admissible), admissible)


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
    jobs = []
    for pack in (False, True):  # a batch, and a pack (its block table and offsets)
        meta = {"STRIDE": 8, "T_CHUNK": 2, "GROUPS_Q": 16, "GROUPS_K": 16, "TILE_A": 16, "TILE_B": 16, "BLOCK_D": 128,
                "CAUSAL": True, "VARLEN": pack, "PRECISION": "tf32"}
        pointers = {"Q": "*bf16", "K": "*bf16", "OUT": "*fp32",
                    **{name: "*i32" if pack else None for name in ("TILES", "TILE_BASE", "CU_Q", "CU_K")}}
        jobs.append({"kernel": "attnzoo.kernels.scoring:_antidiagonal_kernel", "pointers": pointers,
                     "floats": ["est_scale_log2"], "constexprs": meta, "arch": 90, "num_warps": 4})
    result = compile_in_subprocess(jobs)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("ok ") == len(jobs), result.stdout


@pytest.mark.parametrize("params, match", [
    ({"stride": 3}, "power of two"),
    ({"stride": 0}, "power of two"),
    ({"stride": 64, "block_size": 32}, "divide the block size"),
    ({"threshold": -0.1}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"block_size": 48}, "block_size must be a power of two >= 16, got 48"),
])
def test_bad_parameters_are_rejected(params, match):
    q = k = v = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match=match):
        attnzoo.get("xattention", **params)(q, k, v, backend="torch")
