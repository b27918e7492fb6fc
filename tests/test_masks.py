"""attnzoo.masks: each builder against its definition, read off the element mask or written out in
attnzoo.reference (s2), and small cases drawn by hand."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo import masks
from attnzoo.block_mask import BlockMask
from attnzoo.reference import visible_mask
from attnzoo.reference.blocks import admissible_blocks, blocks_touched
from attnzoo.reference.s2 import kv_head_pattern
from pictures import draw, picture

BLOCKS = st.sampled_from([16, 32])
LENGTHS = st.integers(1, 150)


@given(n=LENGTHS, m=LENGTHS, block_q=BLOCKS, block_k=BLOCKS)
@settings()
def test_causal_keeps_the_blocks_causal_attention_touches(n, m, block_q, block_k):
    block_mask = masks.causal(n, m, (block_q, block_k))
    assert block_mask.block_size == (block_q, block_k)
    want = blocks_touched(visible_mask(n, m, causal=True), block_q, block_k)
    assert torch.equal(block_mask.to_dense()[0, 0], want)


@pytest.mark.parametrize("n, m, block_size, want", [
    (64, 64, 16, "#...\n##..\n###.\n####"),
    (32, 64, 16, "###.\n####"),   # queries at i + 32: the first query block reaches key 47
    (64, 32, 16, "..\n..\n#.\n##"),  # the first 32 queries see no key
    (40, 40, 16, "#..\n##.\n###"),   # ragged last blocks
    (64, 64, (16, 32), "#.\n#.\n##\n##"),
], ids=["square", "N<M", "N>M", "ragged", "16x32"])
def test_causal_by_hand(n, m, block_size, want):
    got = masks.causal(n, m, block_size).to_dense()[0, 0]
    assert torch.equal(got, picture(want)), draw(got)


def test_sliding_window_by_hand():
    """A causal window of 20 keys (left 20, right 0) over 6 blocks of 16: query block i touches key
    blocks i - 2 .. i (its first query reaches back 20 keys, past one block boundary)."""
    got = masks.sliding_window(96, 96, (20, 0), 16).to_dense()[0, 0]
    want = picture("""
        #.....
        ##....
        ###...
        .###..
        ..###.
        ...###""")
    assert torch.equal(got, want), draw(got)


@given(n=LENGTHS, m=LENGTHS, block=BLOCKS, left=st.integers(-1, 80), right=st.integers(-1, 80))
@settings()
def test_sliding_window_keeps_the_blocks_the_window_touches(n, m, block, left, right):
    block_mask = masks.sliding_window(n, m, (left, right), block)
    want = blocks_touched(visible_mask(n, m, window_size=(left, right)), block, block)
    assert torch.equal(block_mask.to_dense()[0, 0], want)


S2_ARGS = {"n": st.integers(1, 200), "m": st.integers(1, 200), "block": BLOCKS, "local": st.integers(1, 4),
               "stride": st.integers(1, 6), "heads": st.integers(1, 8), "offset": st.integers(0, 5),
           "causal": st.booleans()}


@given(**S2_ARGS, dense=st.integers(0, 2))
@settings()
def test_local_strided_matches_its_definition(n, m, block, local, stride, heads, offset, causal, dense):
    dense = min(dense, heads)
    got = masks.local_strided(n, m, block, local_blocks=local, vert_stride=stride, heads=heads, causal=causal,
                              num_dense_heads=dense, head_sliding_offset=offset).to_dense()[0]
    for h in range(heads):
        want = kv_head_pattern(n, m, h, kv_heads=heads, block_size=block, local_blocks=local, vert_stride=stride,
                               num_dense_heads=dense, head_sliding_offset=offset, causal=causal)
        assert torch.equal(got[h], want), h


@given(**S2_ARGS)
@settings()
def test_local_strided_row_counts(n, m, block, local, stride, heads, offset, causal):
    """Causal, N = M: row i of head h keeps min(i + 1, local) local blocks plus the strided blocks
    j <= i - local with (j + h * step + offset) % stride == 0."""
    got = masks.local_strided(n, n, block, local_blocks=local, vert_stride=stride, heads=heads, causal=True,
                              head_sliding_offset=offset).to_dense()[0]
    step = max(1, stride // heads)
    for h in range(heads):
        for i in range(got.shape[1]):
            strided = sum((j + h * step + offset) % stride == 0 for j in range(i - local + 1))
            assert got[h, i].sum().item() == min(i + 1, local) + strided


@given(n=st.integers(1, 300), block=BLOCKS, local=st.integers(1, 3), stride=st.integers(1, 6), extra=st.integers(0, 3))
@settings()
def test_local_strided_heads_cover_every_causal_block(n, block, local, stride, extra):
    """With at least vert_stride heads (step 1), every residue is some head's stride phase."""
    heads = stride + extra
    got = masks.local_strided(n, n, block, local_blocks=local, vert_stride=stride, heads=heads).to_dense()[0]
    n_blocks = -(-n // block)
    assert torch.equal(got.any(0), torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril())  # every j <= i


@given(n=st.integers(1, 300), block=BLOCKS, local=st.integers(1, 3), stride=st.integers(1, 6),
       heads=st.integers(1, 4), longer=st.integers(0, 200))
@settings()
def test_local_strided_special_cases(n, block, local, stride, heads, longer):
    n_blocks = -(-n // block)
    causal_blocks = torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()  # N = M: key block j <= query block i
    dense = masks.local_strided(n, n, block, local_blocks=local, vert_stride=1, heads=heads).to_dense()[0]
    assert torch.equal(dense, causal_blocks.expand_as(dense))
    homo = masks.local_strided(n, n, block, local_blocks=local, vert_stride=stride, heads=heads,
                               homo_head=True).to_dense()[0]
    assert torch.equal(homo, homo[:1].expand_as(homo))
    prefix = masks.local_strided(n + longer, n + longer, block, local_blocks=local, vert_stride=stride,
                                 heads=heads).to_dense()[0]
    short = masks.local_strided(n, n, block, local_blocks=local, vert_stride=stride, heads=heads).to_dense()[0]
    assert torch.equal(prefix[:, : short.shape[1], : short.shape[2]], short)  # KV-cache friendly


@pytest.mark.parametrize("kwargs, match", [
    ({"local_blocks": 0}, "local_blocks"),
    ({"vert_stride": 0}, "vert_stride"),
    ({"num_dense_heads": 3, "heads": 2}, "num_dense_heads"),
    ({"num_dense_heads": 1, "heads": 2, "homo_head": True}, "homo_head"),
])
def test_local_strided_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        masks.local_strided(64, 64, 16, **kwargs)


@given(seed=st.integers(0, 2**31 - 1), n=LENGTHS, m=LENGTHS, block=BLOCKS, density=st.floats(0, 1),
       causal=st.booleans(), batch=st.integers(1, 2), heads=st.integers(1, 3))
@settings()
def test_random_keeps_the_asked_share_of_admissible_blocks(seed, n, m, block, density, causal, batch, heads):
    got = masks.random(n, m, density, block, batch=batch, heads=heads, seed=seed, causal=causal)
    assert got.shape == (batch, heads, -(-n // block), -(-m // block))
    admissible = admissible_blocks(n, m, block, block, causal=causal)
    assert not (got.to_dense() & ~admissible).any()
    want = torch.tensor([math.floor(a * density + 0.5) for a in admissible.sum(-1).tolist()])
    assert torch.equal(got.to_dense().sum(-1), want.expand(batch, heads, -1))
    again = masks.random(n, m, density, block, batch=batch, heads=heads, seed=seed, causal=causal)
    assert torch.equal(again.to_dense(), got.to_dense())


@pytest.mark.parametrize("density", [-0.1, 1.5, float("nan"), True])
def test_random_rejects_bad_density(density):
    with pytest.raises(ValueError, match="density"):
        masks.random(64, 64, density, 16)


@given(seed=st.integers(0, 2**31 - 1), n_qb=st.integers(1, 5), n_kb=st.integers(1, 5))
@settings()
def test_and_or_combine_blocks(seed, n_qb, n_kb):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(2, 1, n_qb, n_kb, generator=gen) < 0.5
    b = torch.rand(1, 3, n_qb, n_kb, generator=gen) < 0.5
    c = torch.rand(1, 1, n_qb, n_kb, generator=gen) < 0.5
    both = masks.and_(BlockMask(a, 16), b, BlockMask(c, 16))
    either = masks.or_(BlockMask(a, 16), b, c)
    assert isinstance(both, BlockMask) and both.block_size == (16, 16)
    assert torch.equal(both.to_dense(), a & b & c)
    assert torch.equal(either.to_dense(), a | b | c)
    assert torch.equal(masks.and_(a, b), a & b)  # tensors in, tensor out


def test_combinators_reject_mixed_block_sizes_and_non_bool():
    ones = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="block sizes"):
        masks.or_(BlockMask(ones, 16), BlockMask(ones, 32))
    with pytest.raises(TypeError, match="bool"):
        masks.and_(ones, ones.float())
    with pytest.raises(ValueError, match="two"):
        masks.and_(ones)
