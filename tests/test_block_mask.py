"""attnzoo.block_mask.BlockMask: input checks, the kernel index (full/partial lists and transposes),
density / to_dense / repr, and the FlexAttention conversion."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnzoo.block_mask import BlockMask
from attnzoo.geometry import block_geometry
from attnzoo.reference import attention, expand_block_mask, visible_mask
from attnzoo.reference.blocks import admissible_blocks, fully_visible_blocks
from pictures import picture

BLOCKS = st.sampled_from([16, 32])


def _random_mask(seed: int, shape, density: float = 0.5) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < density


def _blocks_seen(n, m, block_q, block_k, *, causal, window=(-1, -1)):
    """Bool (nQB, nKB) read off the element mask: blocks holding any visible pair, and blocks where
    every real query sees block_k real keys."""
    return (admissible_blocks(n, m, block_q, block_k, causal=causal, window_size=window),
            fully_visible_blocks(n, m, block_q, block_k, causal=causal, window_size=window))


def _from_lists(counts, indices, cols: int) -> torch.Tensor:
    """Kernel lists back to a bool (..., rows, cols): the first `count` indices of each row."""
    valid = torch.arange(indices.shape[-1]) < counts[..., None].long()
    dense = torch.zeros(*indices.shape[:-1], cols, dtype=torch.int32)
    return dense.scatter_add(-1, indices.long(), valid.int()).bool()


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 100), m=st.integers(1, 100), block_q=BLOCKS,
       block_k=BLOCKS, causal=st.booleans(), left=st.integers(-1, 40), heads=st.integers(1, 3))
@settings()
def test_sparse_index_lists_the_mask_split_into_full_and_partial(seed, n, m, block_q, block_k, causal, left, heads):
    n_qb, n_kb = -(-n // block_q), -(-m // block_k)
    mask = _random_mask(seed, (2, heads, n_qb, n_kb))
    index = BlockMask(mask, (block_q, block_k)).sparse_index(n, m, causal=causal, window=(left, -1))
    any_seen, all_seen = _blocks_seen(n, m, block_q, block_k, causal=causal, window=(left, -1))

    full = _from_lists(index.kv_count_full, index.kv_index_full, n_kb)
    part = _from_lists(index.kv_count_part, index.kv_index_part, n_kb)
    assert torch.equal(full, mask & all_seen)
    assert torch.equal(part, mask & any_seen & ~all_seen)
    assert torch.equal(_from_lists(index.q_count_full, index.q_index_full, n_qb), full.transpose(-1, -2))
    assert torch.equal(_from_lists(index.q_count_part, index.q_index_part, n_qb), part.transpose(-1, -2))
    for counts, indices in ((index.kv_count_full, index.kv_index_full), (index.q_count_part, index.q_index_part)):
        listed = torch.where(torch.arange(indices.shape[-1]) < counts[..., None], indices, indices.shape[-1])
        assert torch.equal(listed, listed.sort(dim=-1).values)  # selected indices first, ascending


@given(n=st.integers(1, 100), m=st.integers(1, 100), block_q=BLOCKS, block_k=BLOCKS, causal=st.booleans(),
       left=st.integers(-1, 40), right=st.integers(-1, 40))
@settings()
def test_block_geometry_matches_the_element_mask(n, m, block_q, block_k, causal, left, right):
    any_visible, fully = block_geometry(n, m, block_q, block_k, causal=causal, window=(left, right))
    want_any, want_all = _blocks_seen(n, m, block_q, block_k, causal=causal, window=(left, right))
    assert torch.equal(any_visible, want_any)
    assert torch.equal(fully, want_all)


def test_sparse_index_by_hand():
    """Causal, 3 x 3 blocks of 16 over N = M = 48, mask below: the diagonal blocks need the element
    mask (partial), the blocks under the diagonal do not (full), the block above it is never listed."""
    mask = picture("""
        ##.
        .##
        #.#""")
    index = BlockMask(mask, 16).sparse_index(48, 48, causal=True)
    assert torch.equal(_from_lists(index.kv_count_full, index.kv_index_full, 3)[0, 0], picture("...\n...\n#.."))
    assert torch.equal(_from_lists(index.kv_count_part, index.kv_index_part, 3)[0, 0], picture("#..\n.#.\n..#"))
    assert torch.equal(_from_lists(index.q_count_part, index.q_index_part, 3)[0, 0], picture("#..\n.#.\n..#"))


def test_density_to_dense_and_repr():
    mask = torch.tensor([[True, False], [True, True]])
    block_mask = BlockMask(mask, 32)
    assert block_mask.density() == pytest.approx(0.75)
    assert block_mask.shape == (1, 1, 2, 2)
    assert torch.equal(block_mask.to_dense(), mask[None, None])
    text = repr(block_mask)
    assert "block_size=(32, 32)" in text and "density=0.750" in text and "#.\n  ##" in text
    assert "mask[0, 0]" not in repr(BlockMask(torch.ones(1, 1, 17, 2, dtype=torch.bool), 16))
    assert "#" * 16 in repr(BlockMask(torch.ones(1, 1, 16, 16, dtype=torch.bool), 16))  # 16 x 16 is drawn


def test_index_cache_reuses_an_index_and_evicts_the_least_recently_used_geometry():
    """One index per geometry (N, M, causal, window), built once and handed out again; with all
    INDEX_CACHE_ENTRIES (4) geometries held, touching the first and adding a fifth evicts the second."""
    mask = BlockMask(torch.ones(1, 1, 4, 4, dtype=torch.bool), 16)
    lengths = [49, 50, 51, 52, 53]
    first = mask.sparse_index(49, 49, causal=False)
    assert mask.sparse_index(49, 49, causal=False) is first
    for n in lengths[1:4]:
        mask.sparse_index(n, n, causal=False)
    mask.sparse_index(49, 49, causal=False)
    mask.sparse_index(53, 53, causal=False)
    held = sorted(n for n, *_ in mask._index_cache)
    assert held == [49, 51, 52, 53]


@pytest.mark.parametrize("mask, block_size, error", [
    (torch.ones(1, 1, 2, 2), 16, TypeError),  # float, not bool
    ([[True]], 16, TypeError),
    (torch.ones(2, 2, 2, dtype=torch.bool), 16, ValueError),
    (torch.ones(1, 1, 0, 2, dtype=torch.bool), 16, ValueError),
    (torch.ones(1, 1, 2, 2, dtype=torch.bool), 24, ValueError),
    (torch.ones(1, 1, 2, 2, dtype=torch.bool), 8, ValueError),
    (torch.ones(1, 1, 2, 2, dtype=torch.bool), (16, 16, 16), TypeError),
])
def test_bad_masks_are_rejected(mask, block_size, error):
    with pytest.raises(error, match="block"):
        BlockMask(mask, block_size)


def test_check_fits_names_the_mismatch():
    block_mask = BlockMask(torch.ones(2, 3, 4, 2, dtype=torch.bool), (16, 32))
    block_mask.check_fits(2, 3, 64, 64)
    block_mask.check_fits(2, 3, 49, 33)
    with pytest.raises(ValueError, match="N=65, M=64 need 5x2"):
        block_mask.check_fits(2, 3, 65, 64)
    with pytest.raises(ValueError, match=r"expected \(2\|1, 6\|1"):
        block_mask.check_fits(2, 6, 64, 64)
    with pytest.raises(ValueError, match="meta"):
        block_mask.check_fits(2, 3, 64, 64, device="meta")


flex = pytest.importorskip("torch.nn.attention.flex_attention", reason="torch without FlexAttention")


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 64), m=st.integers(1, 64), block_q=BLOCKS,
       block_k=BLOCKS, causal=st.booleans(), batch=st.sampled_from([1, 2]), heads=st.sampled_from([1, 2]))
@settings()
def test_flex_conversion_round_trips_and_attends_like_the_reference(seed, n, m, block_q, block_k, causal, batch,
                                                                    heads):
    n_qb, n_kb = -(-n // block_q), -(-m // block_k)
    mask = _random_mask(seed, (batch, heads, n_qb, n_kb), 0.6)
    block_mask = BlockMask(mask, (block_q, block_k))
    flex_mask = block_mask.to_flex(n, m, causal=causal)
    any_seen, _ = _blocks_seen(n, m, block_q, block_k, causal=causal)
    back = BlockMask.from_flex(flex_mask)
    assert back.block_size == (block_q, block_k)
    assert torch.equal(back.to_dense(), mask & any_seen)

    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, length, 16, generator=gen, dtype=torch.float64) for length in (n, m, m))
    out = flex.flex_attention(q, k, v, block_mask=flex_mask)
    expected = attention(q, k, v, causal=causal, mask=expand_block_mask(mask, n, m, block_q, block_k))
    sees_any = expand_block_mask(mask, n, m, block_q, block_k) & visible_mask(n, m, causal=causal)
    rows = sees_any.expand(2, 2, n, m).any(-1)  # Flex's value on rows with no key is its own convention
    torch.testing.assert_close(out[rows], expected[rows], rtol=1e-10, atol=1e-10)
