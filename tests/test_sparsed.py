"""sparsed: the top-k block-mean selection (against the float64 softmax map), the isolated
generation region, the dense-early / frozen-pattern schedule, and the output for the returned mask."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.reference import attention, expand_block_mask
from attnzoo.reference import sparsed as oracle
from pictures import draw, picture

BACKENDS = st.sampled_from(["triton", "torch"])


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setenv("ATTNZOO_POISON", "1")


@st.composite
def problems(draw):
    kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    m = draw(st.integers(1, 64))
    return {"seed": draw(st.integers(0, 2**31 - 1)), "batch": draw(st.integers(1, 2)), "q_heads": kv_heads * group,
            "kv_heads": kv_heads, "n": draw(st.integers(1, 64)), "m": m, "d": draw(st.sampled_from([16, 32])),
            "block": draw(st.sampled_from([16, 32])), "select": draw(st.floats(0, 1)),
            "gen_len": draw(st.none() | st.integers(1, m))}


def _inputs(p, seed_offset: int = 0):
    gen = torch.Generator().manual_seed(p["seed"] + seed_offset)
    shapes = ((p["q_heads"], p["n"]), (p["kv_heads"], p["m"]), (p["kv_heads"], p["m"]))
    return [torch.randn(p["batch"], h, length, p["d"], generator=gen) for h, length in shapes]


@given(p=problems(), backend=BACKENDS)
@settings()
def test_selection_is_the_top_k_of_block_mean_probabilities_per_region(p, backend):
    q, k, v = _inputs(p)
    out, block_mask = attnzoo.get("sparsed", select=p["select"], block_size=p["block"], gen_len=p["gen_len"])(
        q, k, v, backend=backend, return_block_mask=True)
    kept = block_mask.to_dense()
    regions = oracle.regions(q, k, select=p["select"], block_q=p["block"], block_k=p["block"], gen_len=p["gen_len"])
    bounds = [start for start, _, _ in regions] + [kept.shape[-1]]
    for (start, scores, count), end in zip(regions, bounds[1:]):
        assert oracle.is_top_k(scores, kept[..., start:end], count), (start, count)
        assert (kept[..., start:end].sum(-1) >= 1).all()  # every row keeps a block of every region
    mask = expand_block_mask(kept, p["n"], p["m"], p["block"], p["block"])
    torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double(), mask=mask),
                               rtol=1e-5, atol=1e-5)


@given(p=problems(), skip=st.floats(0, 0.6), total_steps=st.integers(2, 6))
@settings()
def test_schedule_runs_dense_then_freezes_the_pattern_of_step_t_star(p, skip, total_steps):
    """Steps <= t* are dense; step t* stores its pattern; later steps reuse it whatever q, k they get,
    and then never read V outside it (poisoned here; checked on the kernel backend)."""
    fn = attnzoo.get("sparsed", select=p["select"], block_size=p["block"], gen_len=p["gen_len"], skip=skip,
                     total_steps=total_steps)
    made_at = math.floor(total_steps * skip) + 1  # t*
    cache = {}
    for step in range(made_at + 1):
        q, k, v = _inputs(p, seed_offset=step)
        out, block_mask = fn(q, k, v, step=step, cache=cache, backend="torch", return_block_mask=True)
        assert block_mask.to_dense().all()
        torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double()), rtol=1e-5, atol=1e-5)
    frozen = next(iter(cache.values())).to_dense()
    _, made = attnzoo.get("sparsed", select=p["select"], block_size=p["block"], gen_len=p["gen_len"])(
        q, k, v, backend="torch", return_block_mask=True)
    assert torch.equal(frozen, made.to_dense())

    q, k, v = _inputs(p, seed_offset=made_at + 1)
    unread = ~frozen.unflatten(1, (p["kv_heads"], -1)).any(2).any(2)  # (B, Hk, nKB)
    v_bad = v.masked_fill(expand_block_mask(unread[:, :, None], 1, p["m"], 1, p["block"])[:, :, 0, :, None],
                          float("nan"))
    out, block_mask = fn(q, k, v_bad, step=made_at + 1, cache=cache, backend="triton", return_block_mask=True)
    assert torch.equal(block_mask.to_dense(), frozen)
    mask = expand_block_mask(frozen, p["n"], p["m"], p["block"], p["block"])
    torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double(), mask=mask),
                               rtol=1e-5, atol=1e-5)


def test_selection_by_hand():
    """Four key blocks of 16; query block 0 attends to key 40 (block 2), query block 1 to key 10 (block 0):
    select 0.25 keeps floor(4 * 0.25) + 1 = 2 blocks per row, the attended one first. With gen_len 16
    the last block is its own region and keeps its own top floor(1 * 0.25) + 1 = 1 block, the prompt
    region (blocks 0-2) keeps its top 2."""
    k = torch.zeros(1, 1, 64, 16)
    k[0, 0, :, 0] = torch.arange(64) * 0.01  # a mild preference for later keys everywhere
    k[0, 0, 40, 1] = k[0, 0, 10, 2] = 1.0
    q = torch.zeros(1, 1, 32, 16)
    q[0, 0, :16, 1] = q[0, 0, 16:, 2] = 40.0
    q[0, 0, :, 0] = 1.0
    fn = attnzoo.get("sparsed", select=0.25, block_size=16)
    _, block_mask = fn(q, k, k, backend="torch", return_block_mask=True)
    assert torch.equal(block_mask.to_dense()[0, 0], picture("..##\n#..#")), draw(block_mask.to_dense()[0, 0])
    _, block_mask = fn(q, k, k, backend="torch", gen_len=16, return_block_mask=True)
    assert torch.equal(block_mask.to_dense()[0, 0], picture(".###\n#.##")), draw(block_mask.to_dense()[0, 0])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_select_one_and_skip_one_equal_dense(backend):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=gen) for _ in range(3))
    dense = attention(q.double(), k.double(), v.double())
    out = attnzoo.get("sparsed", select=1.0, block_size=16, gen_len=20)(q, k, v, backend=backend)
    torch.testing.assert_close(out.double(), dense, rtol=1e-5, atol=1e-5)
    cache = {}
    for step in range(3):
        out = attnzoo.get("sparsed", skip=1.0, block_size=16, total_steps=3)(q, k, v, step=step, cache=cache,
                                                                            backend=backend)
        torch.testing.assert_close(out.double(), dense, rtol=1e-5, atol=1e-5)
    assert not cache


def test_gradients_equal_the_masked_reference():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=gen).requires_grad_() for _ in range(3))
    out, block_mask = attnzoo.get("sparsed", block_size=16)(q, k, v, backend="torch", return_block_mask=True)
    grad_out = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    mask = expand_block_mask(block_mask.to_dense(), 40, 40, 16, 16)
    want = torch.autograd.grad(attention(q64, k64, v64, mask=mask), (q64, k64, v64), grad_out.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("call, error, match", [
    ({"causal": True}, ValueError, "causal"),
    ({"select": 1.5}, ValueError, "select"),
    ({"skip": -1.0}, ValueError, "skip"),
    ({"gen_len": 0}, ValueError, "gen_len"),
    ({"gen_len": 33}, ValueError, "gen_len"),
    ({"step": 1}, ValueError, "total_steps"),
    ({"step": 1, "total_steps": 4}, TypeError, "cache"),
    ({"step": 3, "total_steps": 4, "cache": {}}, ValueError, "run step 1"),
])
def test_bad_calls_are_rejected(call, error, match):
    q = k = v = torch.randn(1, 1, 32, 16)
    with pytest.raises(error, match=match):
        attnzoo.get("sparsed", block_size=16)(q, k, v, backend="torch", **call)


def test_the_generation_region_is_ranked_with_all_of_it_visible():
    """The isolated selection ranks the generation region's key blocks for every query row with the
    whole region visible (diffusion attention is bidirectional). One block kept per region (select=0)
    and the last key block aligned with every query: every query block keeps key block 0 (the prompt
    region's only block) and key block 3, and nothing else."""
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(16, generator=gen)
    u = u / u.norm()
    q = (4 * u).expand(1, 1, 64, 16).clone()
    k = 0.1 * torch.randn(1, 1, 64, 16, generator=gen)
    k[:, :, 48:] += 4 * u
    for backend in ("torch", "triton"):
        _, block_mask = attnzoo.get("sparsed", select=0.0, block_size=16, gen_len=48)(q, k, k, backend=backend,
                                                                                     return_block_mask=True)
        assert block_mask.to_dense()[0, 0].tolist() == [[True, False, False, True]] * 4


def test_a_dense_step_returns_every_block_of_the_call():
    """Steps before skip * total_steps are dense: the returned mask holds every block of (N, M), here
    ceil(40 / 16) x ceil(72 / 16), for any batch and head count (here 1 and 3), and the output is
    full attention."""
    q, k, v = torch.randn(1, 3, 40, 16), torch.randn(1, 3, 72, 16), torch.randn(1, 3, 72, 16)
    fn = attnzoo.get("sparsed", block_size=16, skip=0.5, total_steps=4, step=0)
    out, block_mask = fn(q, k, v, cache={}, return_block_mask=True)
    kept = block_mask.to_dense()
    assert kept.shape[0] == 1 and kept.shape[1] in (1, 3)  # (B | 1, Hq | 1, ...) as every returned mask
    assert kept.shape[-2:] == (3, 5) and kept.all()
    torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double(), causal=False),
                               rtol=1e-5, atol=1e-5)
