"""attnzoo.masks: each builder against its definition, written independently here."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo import masks
from attnzoo.block_mask import BlockMask
from attnzoo.reference import visible_mask

BLOCKS = st.sampled_from([16, 32])
LENGTHS = st.integers(1, 150)


def _blocks_touched(n, m, block_q, block_k, keep: torch.Tensor) -> torch.Tensor:
    """Bool (nQB, nKB): blocks of the element mask keep (N, M) holding any True."""
    n_qb, n_kb = -(-n // block_q), -(-m // block_k)
    padded = torch.zeros(n_qb * block_q, n_kb * block_k, dtype=torch.bool)
    padded[:n, :m] = keep
    return padded.unflatten(0, (n_qb, block_q)).unflatten(2, (n_kb, block_k)).any(3).any(1)


@given(n=LENGTHS, m=LENGTHS, block_q=BLOCKS, block_k=BLOCKS)
@settings()
def test_causal_keeps_the_blocks_causal_attention_touches(n, m, block_q, block_k):
    block_mask = masks.causal(n, m, (block_q, block_k))
    assert block_mask.block_size == (block_q, block_k)
    want = _blocks_touched(n, m, block_q, block_k, visible_mask(n, m, causal=True))
    assert torch.equal(block_mask.to_dense()[0, 0], want)


@given(n=LENGTHS, m=LENGTHS, block=BLOCKS, left=st.integers(-1, 80), right=st.integers(-1, 80))
@settings()
def test_sliding_window_keeps_the_blocks_the_window_touches(n, m, block, left, right):
    block_mask = masks.sliding_window(n, m, (left, right), block)
    want = _blocks_touched(n, m, block, block, visible_mask(n, m, window_size=(left, right)))
    assert torch.equal(block_mask.to_dense()[0, 0], want)


def _s2_definition(n_qb, n_kb, diag, head, step, *, local, stride, offset, causal):
    """One head's S2 pattern by loops over blocks (diag[i] = diagonal key block of query block i)."""
    keep = torch.zeros(n_qb, n_kb, dtype=torch.bool)
    for i in range(n_qb):
        d = diag[i]
        for j in range(n_kb):
            if causal:
                keep[i, j] = j <= d and (d - j < local or (j + head * step + offset) % stride == 0)
            else:
                outside = max(0, d - j - local + 1) + max(0, j - d - local + 1)
                keep[i, j] = outside % stride == 0
    return keep


S2_ARGS = {"n": st.integers(1, 200), "m": st.integers(1, 200), "block": BLOCKS, "local": st.integers(1, 4),
               "stride": st.integers(1, 6), "heads": st.integers(1, 8), "offset": st.integers(0, 5),
           "causal": st.booleans()}


@given(**S2_ARGS, dense=st.integers(0, 2))
@settings()
def test_local_strided_matches_its_definition(n, m, block, local, stride, heads, offset, causal, dense):
    dense = min(dense, heads)
    got = masks.local_strided(n, m, block, local_blocks=local, vert_stride=stride, heads=heads, causal=causal,
                              num_dense_heads=dense, head_sliding_offset=offset).to_dense()[0]
    n_qb, n_kb = -(-n // block), -(-m // block)
    diag = [(min((i + 1) * block, n) - 1 + m - n) // block for i in range(n_qb)]
    step = max(1, stride // heads)
    for h in range(heads):
        if h >= heads - dense:
            want = torch.tensor([[not causal or j <= diag[i] for j in range(n_kb)] for i in range(n_qb)])
        else:
            want = _s2_definition(n_qb, n_kb, diag, h, step, local=local, stride=stride, offset=offset,
                                  causal=causal)
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
    assert torch.equal(got.any(0), masks.causal(n, n, block).to_dense()[0, 0])


@given(n=st.integers(1, 300), block=BLOCKS, local=st.integers(1, 3), stride=st.integers(1, 6),
       heads=st.integers(1, 4), longer=st.integers(0, 200))
@settings()
def test_local_strided_special_cases(n, block, local, stride, heads, longer):
    causal_blocks = masks.causal(n, n, block).to_dense()[0, 0]
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
    admissible = masks.causal(n, m, block).to_dense()[0, 0] if causal else torch.ones(got.shape[2:], dtype=torch.bool)
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
