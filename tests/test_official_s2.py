"""s2 against dkernel's pattern builder, restated here in float64-free integer arithmetic.

The oracle follows linxihui/dkernel (snapshot 0d4e90e) `dkernel/utils.py` `get_sparse_attn_mask`
with seqlen = kv_seqlen, past_len 0 and the default vert_position_type ("absolute" for causal,
"relative" otherwise): `num_heads` counts query heads (its docs: "number of q heads"), the default
`head_sliding_step` is max(1, int(vert_stride / num_heads)), kv head h's stride phase is
h * head_sliding_step + head_sliding_offset, the query heads of kv head h are h * G .. h * G + G - 1,
the last `num_dense_heads` kv heads are dense, and homo_head replaces num_heads by 1 (one pattern).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo


def dkernel_pattern(num_heads, seqlen, *, block_size, local_blocks, vert_stride, homo_head, num_kv_heads,
                    head_sliding_step, head_sliding_offset, num_dense_heads, causal):
    """get_sparse_attn_mask's block mask: bool (num_heads or 1 with homo_head, nB, nB)."""
    if homo_head:
        num_heads, num_kv_heads = 1, None  # one pattern, broadcast over the heads
    num_kv_heads = num_kv_heads or num_heads
    per_kv = num_heads // num_kv_heads
    sparse_heads = num_kv_heads - num_dense_heads
    n_blocks = -(-seqlen // block_size)
    if head_sliding_step is None:
        head_sliding_step = max(1, int(vert_stride / num_heads))
    rows = []
    for h in range(num_kv_heads):
        for _ in range(per_kv):
            row = torch.zeros(n_blocks, n_blocks, dtype=torch.bool)
            for i in range(n_blocks):
                for j in range(n_blocks):
                    if h >= sparse_heads:
                        row[i, j] = True
                    elif causal:  # absolute positions: the stride phase moves with the head
                        vertical = (j + h * head_sliding_step + head_sliding_offset) % vert_stride == 0
                        row[i, j] = vertical or (i - j < local_blocks and j - i < 1)
                    else:  # relative: the distance outside the local band on either side
                        outside = max(0, i - j - local_blocks + 1) + max(0, j - i - local_blocks + 1)
                        row[i, j] = outside % vert_stride == 0
                    if causal:
                        row[i, j] = bool(row[i, j]) and i >= j
            rows.append(row)
    return torch.stack(rows)


@given(kv_heads=st.sampled_from([1, 2, 4, 8]), group=st.sampled_from([1, 2, 4]), vert_stride=st.integers(1, 16),
       local_blocks=st.integers(1, 4), offset=st.integers(0, 5), step=st.sampled_from([None, 0, 1, 2, 3]),
       dense=st.integers(0, 8), homo_head=st.booleans(), causal=st.booleans(), n_blocks=st.integers(1, 12),
       tail=st.integers(0, 15))
@settings()
def test_pattern_equals_dkernel_for_every_head_layout(kv_heads, group, vert_stride, local_blocks, offset, step, dense,
                                                      homo_head, causal, n_blocks, tail):
    q_heads, dense = kv_heads * group, 0 if homo_head else min(dense, kv_heads)
    n = max(1, n_blocks * 16 - tail)
    params = dict(block_size=16, local_blocks=local_blocks, vert_stride=vert_stride, homo_head=homo_head,
                  head_sliding_offset=offset, head_sliding_step=step, num_dense_heads=dense)
    want = dkernel_pattern(q_heads, n, num_kv_heads=kv_heads, causal=causal, **params)
    q = torch.zeros(1, q_heads, n, 16)
    k = torch.zeros(1, kv_heads, n, 16)
    _, block_mask = attnzoo.get("s2", **params)(q, k, k, causal=causal, backend="torch", return_block_mask=True)
    assert torch.equal(block_mask.to_dense()[0], want.expand(q_heads, -1, -1))


def test_gqa_phase_step_counts_query_heads():
    """The issue's case: Hq = 8, Hk = 2, vert_stride 8: dkernel's step is 8 / 8 = 1, so the kv heads'
    phases are {0, 1} (a step of vert_stride // Hk = 4 would give {0, 4})."""
    q, k = torch.zeros(1, 8, 16 * 9, 16), torch.zeros(1, 2, 16 * 9, 16)
    _, block_mask = attnzoo.get("s2", block_size=16, local_blocks=1, vert_stride=8)(
        q, k, k, causal=True, backend="torch", return_block_mask=True)
    last_row = block_mask.to_dense()[0, :, -1]  # query block 8 sees key blocks 0..8
    assert last_row[0].nonzero().flatten().tolist() == [0, 8]  # kv head 0: j % 8 == 0, and the diagonal
    assert last_row[4].nonzero().flatten().tolist() == [7, 8]  # kv head 1: (j + 1) % 8 == 0
    _, stepped = attnzoo.get("s2", block_size=16, local_blocks=1, vert_stride=8, head_sliding_step=4)(
        q, k, k, causal=True, backend="torch", return_block_mask=True)
    assert stepped.to_dense()[0, 4, -1].nonzero().flatten().tolist() == [4, 8]


def test_bad_head_sliding_step_is_rejected():
    q = k = torch.zeros(1, 1, 32, 16)
    with pytest.raises(ValueError, match="head_sliding_step"):
        attnzoo.get("s2", head_sliding_step=-1)(q, k, k, causal=True, backend="torch")
