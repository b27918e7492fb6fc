"""s2: the per-head local + vertical-stride pattern through the method against the rule written out
(attnzoo.reference.s2) and drawn by hand (GQA sharing, dense heads, cache), and forward / backward
against the float64 reference masked with the returned pattern. masks.local_strided's own row counts
and head coverage are tested in test_masks.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.methods.s2 import s2_block_mask
from attnzoo.reference import attention, expand_block_mask
from attnzoo.reference.s2 import s2_pattern
from pictures import draw, picture

BACKENDS = st.sampled_from(["triton", "torch"])


@pytest.fixture(autouse=True)
def poison_kernel_outputs(monkeypatch):
    monkeypatch.setenv("ATTNZOO_POISON", "1")


@st.composite
def configs(draw, max_len: int = 64, max_batch: int = 2):
    kv_heads, group = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    return {"seed": draw(st.integers(0, 2**31 - 1)), "batch": draw(st.integers(1, max_batch)),
            "q_heads": kv_heads * group, "kv_heads": kv_heads, "n": draw(st.integers(1, max_len)),
            "m": draw(st.integers(1, max_len)), "d": draw(st.sampled_from([16, 32])),
            "params": {"block_size": draw(st.sampled_from([16, 32])), "local_blocks": draw(st.integers(1, 2)),
                        "vert_stride": draw(st.integers(1, 4)), "num_dense_heads": draw(st.integers(0, 1)),
                        "head_sliding_offset": draw(st.integers(0, 3))}}


def _inputs(c, *, requires_grad=False):
    gen = torch.Generator().manual_seed(c["seed"])
    shapes = ((c["q_heads"], c["n"]), (c["kv_heads"], c["m"]), (c["kv_heads"], c["m"]))
    return [torch.randn(c["batch"], h, length, c["d"], generator=gen).requires_grad_(requires_grad)
            for h, length in shapes]


def _reference(q, k, v, blocks, c, causal):
    block = c["params"]["block_size"]
    return attention(q, k, v, causal=causal, mask=expand_block_mask(blocks, c["n"], c["m"], block, block))


@given(c=configs(), causal=st.booleans(), backend=BACKENDS)
@settings()
def test_forward_equals_the_masked_reference_with_the_kv_head_pattern(c, causal, backend):
    q, k, v = _inputs(c)
    out, block_mask = attnzoo.get("s2", **c["params"])(q, k, v, causal=causal, backend=backend,
                                                       return_block_mask=True)
    want = s2_pattern(c["n"], c["m"], c["q_heads"], c["kv_heads"], causal=causal, **c["params"])
    assert torch.equal(block_mask.to_dense(), want)
    ref = _reference(q.double(), k.double(), v.double(), block_mask.to_dense(), c, causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@given(c=configs(max_len=40, max_batch=1), causal=st.booleans(), backend=BACKENDS)
@settings()
def test_gradients_equal_the_masked_reference(c, causal, backend):
    q, k, v = _inputs(c, requires_grad=True)
    out, block_mask = attnzoo.get("s2", **c["params"])(q, k, v, causal=causal, backend=backend,
                                                       return_block_mask=True)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(c["seed"] + 1))
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _reference(q64, k64, v64, block_mask.to_dense(), c, causal)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad_out.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # rows that do read the poison
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(33, 64))
@settings()
def test_unselected_key_blocks_are_never_read(seed, n):
    """Causal, one kv head, stride 4, local 1: key blocks 1 and 2 serve only query blocks 1 and 2
    (their diagonals); poisoning them changes nothing for the rows that do not select them."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 1, n, 16, generator=gen) for _ in range(3))
    fn = attnzoo.get("s2", block_size=16, local_blocks=1, vert_stride=4)
    out, block_mask = fn(q, k, v, causal=True, backend="triton", return_block_mask=True)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :, 16:48], v_bad[:, :, 16:48] = float("nan"), float("nan")
    poisoned = fn(q, k_bad, v_bad, causal=True, backend="triton")
    rows = torch.tensor([row for row in range(n) if not 16 <= row < 48])
    assert not block_mask.to_dense()[0, 0][torch.tensor([0] + list(range(3, block_mask.shape[2]))), 1:3].any()
    torch.testing.assert_close(poisoned[:, :, rows], out[:, :, rows], rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_vertical_stride_one_equals_dense(backend):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 50, 16, generator=gen) for _ in range(3))
    out = attnzoo.get("s2", block_size=16, local_blocks=1, vert_stride=1)(q, k, v, causal=True, backend=backend)
    torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double(), causal=True),
                               rtol=1e-5, atol=1e-5)


def test_pattern_is_cached_per_shape_and_dense_heads_are_the_last_kv_heads():
    q, k = torch.randn(1, 4, 96, 16), torch.randn(1, 2, 96, 16)
    fn = attnzoo.get("s2", block_size=16, local_blocks=1, vert_stride=3, num_dense_heads=1)
    _, first = fn(q, k, k, causal=True, backend="torch", return_block_mask=True)
    first.mask[:] = False  # the caller's copy: editing it must not change the cached pattern
    _, again = fn(q, k, k, causal=True, backend="torch", return_block_mask=True)
    cached = s2_block_mask(96, 96, 4, 2, block_size=16, local_blocks=1, vert_stride=3, homo_head=False,
                           num_dense_heads=1, head_sliding_offset=0, causal=True, device=q.device)
    assert s2_block_mask.cache_info().hits >= 2 and again is not cached
    assert torch.equal(again.to_dense(), cached.to_dense()) and again.to_dense().any()
    blocks = again.to_dense()[0]
    # kv head 1 (query heads 2, 3) is dense: every causal block; kv head 0 (query heads 0, 1) keeps the
    # diagonal block and every key block j with j % 3 == 0 (step = max(1, 3 // 4) = 1, phase 0)
    dense = picture("""
        #.....
        ##....
        ###...
        ####..
        #####.
        ######""")
    sparse = picture("""
        #.....
        ##....
        #.#...
        #..#..
        #..##.
        #..#.#""")
    for head, want in enumerate([sparse, sparse, dense, dense]):
        assert torch.equal(blocks[head], want), (head, draw(blocks[head]))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_local_band_and_vertical_stride_by_hand(backend):
    """Causal, one head, 6 blocks of 16: key block j is kept for query block i iff j <= i and
    (i - j < 2 or j % 3 == 0)."""
    q, k, v = (torch.randn(1, 1, 96, 16, generator=torch.Generator().manual_seed(s)) for s in range(3))
    _, block_mask = attnzoo.get("s2", block_size=16, local_blocks=2, vert_stride=3)(
        q, k, v, causal=True, backend=backend, return_block_mask=True)
    want = picture("""
        #.....
        ##....
        ###...
        #.##..
        #..##.
        #..###""")
    assert torch.equal(block_mask.to_dense()[0, 0], want), draw(block_mask.to_dense()[0, 0])


def test_eight_heads_with_vertical_stride_eight_shift_the_stride_one_block_each():
    """vert_stride 8, 8 kv heads, local 1: step = 8 // 8 = 1, so head h keeps, besides the diagonal
    block, key block j iff (j + h) % 8 == 0 (j <= i); together the heads cover every causal block."""
    n_blocks = 12
    q = torch.randn(1, 8, 16 * n_blocks, 16)
    _, block_mask = attnzoo.get("s2", block_size=16, local_blocks=1, vert_stride=8)(
        q, q, q, causal=True, backend="torch", return_block_mask=True)
    blocks = block_mask.to_dense()[0]
    for h in range(8):
        for i in range(n_blocks):
            for j in range(n_blocks):
                assert bool(blocks[h, i, j]) == (j <= i and (j == i or (j + h) % 8 == 0)), (h, i, j)
    assert torch.equal(blocks.any(0), torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril())


def test_non_causal_pattern_by_hand():
    """Non-causal, local 1, vert_stride 2: a block is kept iff its distance outside the diagonal block
    is even, the same for every head."""
    q = torch.randn(1, 2, 80, 16)
    _, block_mask = attnzoo.get("s2", block_size=16, local_blocks=1, vert_stride=2)(
        q, q, q, causal=False, backend="torch", return_block_mask=True)
    want = picture("""
        #.#.#
        .#.#.
        #.#.#
        .#.#.
        #.#.#""")
    for head in range(2):
        assert torch.equal(block_mask.to_dense()[0, head], want), draw(block_mask.to_dense()[0, head])


@pytest.mark.parametrize("params, match", [
    ({"local_blocks": 0}, "local_blocks"),
    ({"vert_stride": 0}, "vert_stride"),
    ({"num_dense_heads": 2}, "num_dense_heads"),
    ({"block_size": 24}, "block_size must be a power of two >= 16, got 24"),
])
def test_bad_parameters_are_rejected(params, match):
    q = k = v = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match=match):
        attnzoo.get("s2", **params)(q, k, v, backend="torch")
