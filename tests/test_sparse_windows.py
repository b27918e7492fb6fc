"""Windows and softcap in every sparse method (what patched sliding-window / soft-capped models need):
the output is attention over the chosen blocks intersected with the window, soft-capped, on both
backends; the returned mask lists the blocks that ran. Checked against a float64 oracle written here."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import attnzoo
from attnzoo import masks

BLOCK = 16
METHODS = {
    "block_sparse": {},
    "xattention": dict(block_size=BLOCK, stride=4, threshold=0.7),
    "seerattention": dict(block_size=BLOCK, topk_ratio=0.6),
    "s2": dict(block_size=BLOCK, local_blocks=1, vert_stride=2),
    "sparsed": dict(block_size=BLOCK, select=0.5),
}


def _oracle(q, k, v, blocks, *, causal, window, softcap):
    """float64: softmax(softcap(q k^T / sqrt(D))) v over the pairs that the blocks, causal and the window allow."""
    N, M, D = q.shape[2], k.shape[2], q.shape[3]
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) / math.sqrt(D)
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    rel = torch.arange(M)[None, :] - torch.arange(N)[:, None] - (M - N)  # key offset from the diagonal
    left, right = window
    right = 0 if causal else right
    seen = (rel <= right if right >= 0 else torch.ones_like(rel, dtype=torch.bool))
    if left >= 0:
        seen = seen & (rel >= -left)
    in_block = blocks.repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[..., :N, :M]
    s = s.masked_fill(~(seen & in_block), -math.inf)
    return torch.nan_to_num(torch.softmax(s, -1)) @ v, (seen & in_block)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("name", sorted(METHODS))
@given(n=st.integers(8, 48), causal=st.booleans(), left=st.integers(0, 20), right=st.integers(-1, 20),
       softcap=st.sampled_from([0.0, 4.0]), seed=st.integers(0, 2**16))
def test_sparse_method_honours_window_and_softcap(backend, name, n, causal, left, right, softcap, seed):
    if name == "sparsed":
        causal = False
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(3))
    params = dict(METHODS[name], window_size=(left, right), softcap=softcap)
    if name == "block_sparse":
        params["block_mask"] = masks.random(n, n, 0.6, BLOCK, heads=2, seed=seed, causal=causal)
    out, ran = attnzoo.get(name, **params)(q, k, v, causal=causal, backend=backend, return_block_mask=True)
    blocks = ran.to_dense().expand(1, 2, -1, -1)
    ref, pairs = _oracle(q.double(), k.double(), v.double(), blocks, causal=causal, window=(left, right),
                         softcap=softcap)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    # every block it reports as run holds a pair the window lets through
    padded = torch.zeros(1, 2, blocks.shape[-2] * BLOCK, blocks.shape[-1] * BLOCK, dtype=torch.bool)
    padded[..., :n, :n] = pairs
    has_pair = padded.unflatten(-1, (-1, BLOCK)).any(-1).unflatten(-2, (-1, BLOCK)).any(-2)
    assert torch.equal(has_pair, blocks)
