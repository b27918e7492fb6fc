"""xattention selection="official" against the reference code's block choice, restated here in float64.

The oracle below follows mit-han-lab/x-attention (snapshot e379887): `xattn_estimate` in
`xattn/src/Xattention.py` (torch path, select_mode="inverse", kdb=1, norm=1) and `find_blocks_chunked`
in `xattn/src/utils.py`, step by step, with its own code and nothing of attnzoo's selection:
q and k zero-padded separately to whole chunks, the strided q/k reshape, one query chunk at a time,
the causal mask aligned to the chunk, padded query groups zeroed, block sums, the walk with its forced
set, its two-position running sum and its redirection of rejected blocks to column 0, and the final
causal clean-up. Where the reference's two paths differ the oracle takes the Triton path (the one the
reference runs on A100/H100): its causal mask hides no key before the chunk, where the torch path's
`causal_mask[..., -0:]` hides every earlier key when M is a whole number of chunks. Ties in the sorts
are broken by the lower block index (stable sorts; the reference's torch.sort is unstable there).
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.reference import attention, expand_block_mask, visible_mask
from attnzoo.reference.blocks import admissible_blocks


def _ceil_to(length: int, multiple: int) -> int:
    return (length + multiple - 1) // multiple * multiple


def reference_chunk_size(k_len: int) -> int:
    """Xattention_prefill's default chunk_size."""
    p = 1 << (k_len - 1).bit_length()
    return int(max(min(max(2048, p), 128 * 1024 * 2048 // p), 2048))


def find_blocks_chunked(sums, current_index: int, threshold: float, causal: bool):
    """utils.py find_blocks_chunked (threshold given, prefill): sums float64 (B, H, R, K) -> bool (B, H, R, K)."""
    B, H, R, K = sums.shape
    required = sums.sum(-1, keepdim=True) * threshold
    zero = torch.zeros(B, H, R, 1, dtype=torch.float64)
    if causal:
        mask = torch.zeros(B, H, R, K, dtype=torch.bool)
        mask[..., 0] = True
        mask[..., current_index:current_index + R] = torch.eye(R, dtype=torch.bool)  # may overwrite column 0
        others_sorted = torch.sort(sums.masked_fill(mask, 0.0), dim=-1, descending=True, stable=True).values
        walk_values = torch.cat([zero, torch.where(mask, sums, 0.0).sum(-1, keepdim=True), others_sorted[..., :-2]], -1)
        order = torch.sort(torch.where(mask, 100000 * (1 + sums), sums), dim=-1, descending=True, stable=True).indices
        before = torch.cat([zero, walk_values[..., :-1]], -1).cumsum(-1)
    else:
        mask = torch.zeros(B, H, R, K, dtype=torch.bool)
        ranked, order = torch.sort(sums, dim=-1, descending=True, stable=True)
        before = torch.cat([zero, ranked[..., :-1]], -1).cumsum(-1)
    order = torch.where(before < required, order, 0)  # rejected positions point at column 0
    mask.scatter_(-1, order, True)
    if causal:
        mask[..., current_index + R:] = False
    return mask


def reference_blocks(q, k, *, block: int, stride: int, threshold: float, chunk: int, causal: bool, scale: float):
    """xattn_estimate's simple_masks, cropped to the real blocks as Xattention_prefill hands them to the
    attention kernel: bool (B, H, ceil(N / block), ceil(M / block)). q (B, H, N, D), k (B, H, M, D) float64."""
    B, H, q_len, _ = q.shape
    k_len = k.shape[2]
    q_pad, k_pad = _ceil_to(q_len, chunk), _ceil_to(k_len, chunk)
    q_chunks, k_chunks = q_pad // chunk, k_pad // chunk
    q_blocks, k_blocks = q_pad // block, k_pad // block
    pq, pk = F.pad(q, (0, 0, 0, q_pad - q_len)), F.pad(k, (0, 0, 0, k_pad - k_len))
    r_chunk, r_block = chunk // stride, block // stride
    r_key = torch.cat([pk[:, :, t::stride] for t in range(stride)], dim=-1)  # group b = k[bS + t], t = 0..S-1
    r_query = torch.cat([pq[:, :, stride - 1 - t::stride] for t in range(stride)], dim=-1)  # q[aS + S-1-t]
    q_group_pad = (q_pad - q_len) // stride
    masks = []
    for c in range(q_chunks):
        logits = r_query[:, :, c * r_chunk:(c + 1) * r_chunk] @ r_key.transpose(-1, -2) * scale / stride
        if causal:  # the chunk's query group a sees key groups up to its own position in the chunk's key range
            start = (c + k_chunks - q_chunks) * r_chunk
            rows = torch.arange(r_chunk)[:, None]
            cols = torch.arange(r_key.shape[2])[None, :]
            logits = logits.masked_fill(cols > start + rows, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if c == q_chunks - 1 and q_group_pad:
            probs[:, :, r_chunk - q_group_pad:] = 0.0  # padded query groups count for nothing
        sums = probs.view(B, H, r_chunk // r_block, r_block, -1, r_block).sum(-1).sum(-2)
        masks.append(find_blocks_chunked(sums, k_blocks - q_blocks + c * (r_chunk // r_block), threshold, causal))
    simple = torch.cat(masks, dim=2)
    if causal:
        square = simple[:, :, -q_blocks:, -q_blocks:]
        simple[:, :, -q_blocks:, -q_blocks:] = square & torch.tril(torch.ones(q_blocks, q_blocks, dtype=torch.bool))
    return simple[:, :, :-(-q_len // block), :-(-k_len // block)]


def _inputs(seed, heads, kv_heads, n, m, d=16):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, heads, n, d, generator=gen), torch.randn(1, kv_heads, m, d, generator=gen),
            torch.randn(1, kv_heads, m, d, generator=gen))


def _reference_for(q, k, **kwargs):
    group = q.shape[1] // k.shape[1]
    return reference_blocks(q.double(), k.double().repeat_interleave(group, dim=1), **kwargs)  # it asserts Hq == Hk


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 100), m=st.integers(1, 100), block=st.sampled_from([16, 32]),
       stride=st.sampled_from([1, 2, 4, 8]), chunks=st.sampled_from([1, 2, 4, None]), causal=st.booleans(),
       heads=st.sampled_from([(1, 1), (2, 1), (2, 2)]), threshold=st.floats(0.0, 0.97),
       backend=st.sampled_from(["torch", "triton"]))
@example(seed=0, n=64, m=64, block=16, stride=4, chunks=None, causal=False, heads=(1, 1), threshold=0.0,
         backend="torch")  # threshold 0: nothing but the forced blocks and block 0 (counted < 0 never holds)
@example(seed=1, n=32, m=96, block=16, stride=4, chunks=1, causal=True, heads=(1, 1), threshold=0.5,
         backend="torch")  # causal N < M over several chunks: query block i's diagonal is key block i + 4
@settings()
def test_official_selection_equals_the_reference_code(seed, n, m, block, stride, chunks, causal, heads, threshold,
                                                      backend):
    """Same blocks as the reference on the same inputs, chunked (chunk = 1, 2, 4 blocks, or the
    reference's default, 2048 here: one chunk) and N == M, N < M, N > M; blocks the attention's
    causal mask leaves empty are left out of attnzoo's mask (they compute nothing in either)."""
    q, k, v = _inputs(seed, heads[0], heads[1], n, m)
    chunk = reference_chunk_size(m) if chunks is None else chunks * block
    fn = attnzoo.get("xattention", selection="official", threshold=threshold, stride=stride, block_size=block,
                     chunk_size=None if chunks is None else chunk)
    if causal and -(-n // chunk) > -(-m // chunk):
        with pytest.raises(ValueError, match="chunk"):
            fn(q, k, v, causal=causal, backend=backend)
        return
    out, got = fn(q, k, v, causal=causal, backend=backend, return_block_mask=True)
    want = _reference_for(q, k, block=block, stride=stride, threshold=threshold, chunk=chunk, causal=causal,
                          scale=16 ** -0.5)
    want = want & admissible_blocks(n, m, block, block, causal=causal)
    assert torch.equal(got.to_dense(), want)
    mask = expand_block_mask(want, n, m, block, block)
    torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double(), causal=causal, mask=mask),
                               rtol=1e-5, atol=1e-5)


def test_first_chunk_keeps_more_than_the_paper_rule():
    """The reference's first chunk (N == M): rows after the first hold only their diagonal as forced
    block, so their walk counts one block late and key block 0 joins afterwards; the paper's rule
    (selection="attnzoo") walks from {block 0, diagonal}. A row where that changes the choice."""
    q, k, v = _inputs(3, 1, 1, 256, 256)
    args = dict(block=32, stride=8, threshold=0.5, chunk=2048, causal=True, scale=0.25)
    official = attnzoo.get("xattention", selection="official", threshold=0.5, stride=8, block_size=32)
    paper = attnzoo.get("xattention", selection="attnzoo", threshold=0.5, stride=8, block_size=32)
    _, got = official(q, k, v, causal=True, backend="torch", return_block_mask=True)
    _, ours = paper(q, k, v, causal=True, backend="torch", return_block_mask=True)
    assert torch.equal(got.to_dense(), _reference_for(q, k, **args))
    assert (ours.to_dense() & ~got.to_dense()).sum() < (got.to_dense() & ~ours.to_dense()).sum()


def test_non_causal_padded_keys_take_mass_in_the_reference():
    """Non-causal, N = M = 40 in one 2048 chunk: the reference's softmax spreads most of each row over
    the 2008 zero-padded keys, whose blocks then take part in the walk (and are cut off afterwards);
    selection="attnzoo" scores only the 40 real keys."""
    q, k, v = _inputs(5, 1, 1, 40, 40)
    kwargs = dict(threshold=0.9, stride=4, block_size=16)
    _, got = attnzoo.get("xattention", selection="official", **kwargs)(q, k, v, backend="torch", return_block_mask=True)
    want = _reference_for(q, k, block=16, stride=4, threshold=0.9, chunk=2048, causal=False, scale=0.25)
    assert torch.equal(got.to_dense(), want)
    assert torch.equal(want[..., 0], torch.ones_like(want[..., 0]))  # column 0: where rejected blocks point


@pytest.mark.parametrize("causal", [False, True])
def test_official_threshold_one_is_dense_where_the_reference_aligns_like_attention(causal):
    q, k, v = _inputs(7, 2, 1, 48, 48)
    out = attnzoo.get("xattention", selection="official", threshold=1.0, stride=4, block_size=16)(
        q, k, v, causal=causal, backend="torch")
    torch.testing.assert_close(out.double(), attention(q.double(), k.double(), v.double(), causal=causal),
                               rtol=1e-5, atol=1e-5)


def test_causal_short_queries_are_top_left_aligned_within_one_chunk():
    """N = 32 < M = 96, one chunk: the reference pads q and k separately to the chunk, so query block i
    is scored and cleaned up against key blocks j <= i (top-left), while attention itself is bottom-right."""
    q, k, v = _inputs(9, 1, 1, 32, 96)
    _, got = attnzoo.get("xattention", selection="official", threshold=0.97, stride=4, block_size=16)(
        q, k, v, causal=True, backend="torch", return_block_mask=True)
    assert not got.to_dense()[..., 2:].any()
    seen = visible_mask(32, 96, causal=True)
    assert seen[:, 32:].any()  # keys that attention would see but the reference never selects


@pytest.mark.parametrize("params, match", [
    ({"selection": "exact"}, "selection"),
    ({"selection": "attnzoo", "chunk_size": 64}, "chunk_size"),
    ({"selection": "official", "block_size": (16, 32)}, "one block size"),
    ({"selection": "official", "chunk_size": 24, "block_size": 16}, "chunk_size"),
])
def test_bad_selection_parameters_are_rejected(params, match):
    q = k = v = torch.randn(1, 1, 32, 16)
    with pytest.raises(ValueError, match=match):
        attnzoo.get("xattention", **params)(q, k, v, backend="torch")
