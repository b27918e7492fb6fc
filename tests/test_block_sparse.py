"""block_sparse: block-sparse FlashAttention over a user mask, on both backends (Triton under the
interpreter, and PyTorch), against the float64 reference masked with the same blocks."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import masks
from attnzoo.block_mask import BlockMask
from attnzoo.reference import attention, expand_block_mask
from pictures import picture

BACKENDS = st.sampled_from(["triton", "torch"])


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setenv("ATTNZOO_POISON", "1")


@st.composite
def problems(draw, max_len: int = 64, max_batch: int = 2):
    """Shapes and a fresh-random-input seed: batch, heads (GQA), lengths, head dims, block sizes."""
    kv_heads, group = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    return {"seed": draw(st.integers(0, 2**31 - 1)), "batch": draw(st.integers(1, max_batch)),
            "q_heads": kv_heads * group, "kv_heads": kv_heads,
            "n": draw(st.integers(1, max_len)), "m": draw(st.integers(1, max_len)),
            "d": draw(st.sampled_from([16, 32])), "dv": draw(st.sampled_from([16, 32])),
            "block_q": draw(st.sampled_from([16, 32])), "block_k": draw(st.sampled_from([16, 32]))}


def _inputs(p, *, requires_grad=False):
    gen = torch.Generator().manual_seed(p["seed"])
    shapes = ((p["q_heads"], p["n"], p["d"]), (p["kv_heads"], p["m"], p["d"]), (p["kv_heads"], p["m"], p["dv"]))
    return [torch.randn(p["batch"], *shape, generator=gen).requires_grad_(requires_grad) for shape in shapes]


def _random_blocks(p, density, *, per_batch=True, per_head=True):
    gen = torch.Generator().manual_seed(p["seed"] + 1)
    shape = (p["batch"] if per_batch else 1, p["q_heads"] if per_head else 1,
             -(-p["n"] // p["block_q"]), -(-p["m"] // p["block_k"]))
    return torch.rand(shape, generator=gen) < density


def _masked_reference(q, k, v, blocks, p, causal):
    mask = expand_block_mask(blocks, p["n"], p["m"], p["block_q"], p["block_k"])
    return attention(q.double(), k.double(), v.double(), causal=causal, mask=mask)


def _assert_close(got, want):
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@given(p=problems(), density=st.floats(0, 1), causal=st.booleans(), backend=BACKENDS,
       per_batch=st.booleans(), per_head=st.booleans())
@settings()
def test_random_masks_equal_the_masked_reference(p, density, causal, backend, per_batch, per_head):
    q, k, v = _inputs(p)
    blocks = _random_blocks(p, density, per_batch=per_batch, per_head=per_head)
    out, returned = attnzoo.get("block_sparse")(q, k, v, causal=causal, backend=backend,
                                               block_mask=BlockMask(blocks, (p["block_q"], p["block_k"])),
                                               return_block_mask=True)
    assert torch.equal(returned.to_dense(), blocks)
    _assert_close(out, _masked_reference(q, k, v, blocks, p, causal))


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("causal", [False, True])
def test_all_blocks_equal_dense_and_no_blocks_give_zeros(backend, causal):
    p = {"seed": 7, "batch": 1, "q_heads": 2, "kv_heads": 1, "n": 45, "m": 61, "d": 32, "dv": 16, "block_q": 16,
         "block_k": 32}
    q, k, v = _inputs(p)
    every = torch.ones(1, 1, 3, 2, dtype=torch.bool)
    out = attnzoo.attention(q, k, v, method="block_sparse", causal=causal, backend=backend, block_mask=every,
                            block_size=(16, 32))
    _assert_close(out, attention(q.double(), k.double(), v.double(), causal=causal))
    empty = attnzoo.attention(q, k, v, method="block_sparse", causal=causal, backend=backend, block_mask=~every,
                              block_size=(16, 32))
    assert torch.equal(empty, torch.zeros_like(empty))


@given(p=problems(), causal=st.booleans(), backend=BACKENDS)
@settings()
def test_unselected_key_blocks_are_never_read(p, causal, backend):
    """NaN in K and V of the key blocks no query block of a kv group selects leaves the output as is:
    the kernel never loads them, and the torch backend zeroes them before its products."""
    q, k, v = _inputs(p)
    blocks = _random_blocks(p, 0.7)
    n_kb = blocks.shape[-1]
    dropped = torch.rand(p["batch"], p["kv_heads"], n_kb, generator=torch.Generator().manual_seed(p["seed"])) < 0.5
    blocks &= ~dropped.repeat_interleave(p["q_heads"] // p["kv_heads"], dim=1)[:, :, None, :]
    poisoned = expand_block_mask(dropped[:, :, None, :], 1, p["m"], 1, p["block_k"])[:, :, 0, :, None]
    k_bad, v_bad = k.masked_fill(poisoned, float("nan")), v.masked_fill(poisoned, float("nan"))
    fn = attnzoo.get("block_sparse", block_mask=BlockMask(blocks, (p["block_q"], p["block_k"])))
    out = fn(q, k_bad, v_bad, causal=causal, backend=backend)
    _assert_close(out, _masked_reference(q, k, v, blocks, p, causal))


@given(p=problems(max_len=40, max_batch=1), density=st.floats(0.3, 1), causal=st.booleans(), backend=BACKENDS)
@settings()
def test_gradients_equal_the_masked_reference(p, density, causal, backend):
    q, k, v = _inputs(p, requires_grad=True)
    blocks = _random_blocks(p, density)
    out = attnzoo.get("block_sparse", block_mask=blocks, block_size=(p["block_q"], p["block_k"]))(
        q, k, v, causal=causal, backend=backend)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(p["seed"] + 2))
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(_masked_reference(q64, k64, v64, blocks, p, causal), (q64, k64, v64),
                               grad_out.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_mask_drawn_by_hand(backend):
    """Blocks of 16 over N = M = 48: each query block attends to exactly the keys of its kept key
    blocks, so its rows equal plain attention over those keys alone."""
    q, k, v = (torch.randn(1, 1, 48, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    blocks = picture("""
        #..
        .##
        #.#""")
    out = attnzoo.get("block_sparse", block_mask=blocks[None, None], block_size=16)(q, k, v, backend=backend)
    for row, keys in [(slice(0, 16), [range(0, 16)]), (slice(16, 32), [range(16, 48)]),
                      (slice(32, 48), [range(0, 16), range(32, 48)])]:
        cols = torch.tensor([j for span in keys for j in span])
        want = attention(q[:, :, row].double(), k[:, :, cols].double(), v[:, :, cols].double())
        torch.testing.assert_close(out[:, :, row].double(), want, rtol=1e-5, atol=1e-5)


def test_masks_helpers_feed_the_method():
    p = {"seed": 3, "batch": 1, "q_heads": 2, "kv_heads": 1, "n": 64, "m": 64, "d": 16, "dv": 16, "block_q": 16,
         "block_k": 16}
    q, k, v = _inputs(p)
    window = masks.and_(masks.causal(64, 64, 16), masks.sliding_window(64, 64, (20, 0), 16))
    out = attnzoo.get("block_sparse", block_mask=window)(q, k, v, causal=True, backend="torch")
    _assert_close(out, _masked_reference(q, k, v, window.to_dense(), p, True))


def test_bad_block_masks_are_rejected():
    q = k = v = torch.randn(1, 2, 64, 16)
    fn = attnzoo.get("block_sparse")
    with pytest.raises(TypeError, match="needs block_mask"):
        fn(q, k, v)
    with pytest.raises(TypeError, match="block_mask must be"):
        fn(q, k, v, block_mask=[[True]])
    with pytest.raises(ValueError, match="N=64, M=64 need 4x4"):
        fn(q, k, v, block_mask=torch.ones(1, 1, 2, 2, dtype=torch.bool), block_size=16)
    with pytest.raises(ValueError, match=r"expected \(1\|1, 2\|1"):
        fn(q, k, v, block_mask=torch.ones(1, 3, 4, 4, dtype=torch.bool), block_size=16)


def test_editing_a_mask_after_use_takes_effect():
    # the kernel index is cached on the BlockMask; an in-place edit must not leave it stale
    p = dict(seed=3, batch=1, q_heads=2, kv_heads=1, n=48, m=48, d=16, dv=16, block_q=16, block_k=16)
    q, k, v = _inputs(p)
    block_mask = BlockMask(torch.ones(1, 1, 3, 3, dtype=torch.bool), 16)
    fn = attnzoo.get("block_sparse", block_mask=block_mask)
    fn(q, k, v, backend="triton")
    block_mask.mask[0, 0, 0, 1] = False
    _assert_close(fn(q, k, v, backend="triton"), _masked_reference(q, k, v, block_mask.mask, p, False))


def test_interpreter_tile_larger_than_the_sparse_block(monkeypatch):
    monkeypatch.setenv("ATTNZOO_INTERPRET_TILE", "32")
    p = dict(seed=4, batch=1, q_heads=1, kv_heads=1, n=64, m=64, d=16, dv=16, block_q=16, block_k=16)
    q, k, v = _inputs(p)
    blocks = _random_blocks(p, 0.6)
    out = attnzoo.get("block_sparse", block_mask=blocks, block_size=16)(q, k, v, causal=True, backend="triton")
    _assert_close(out, _masked_reference(q, k, v, blocks, p, True))
