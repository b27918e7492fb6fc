"""Issue 16, item 5: causal isolation. In causal mode a NaN or inf at position t of q, k or v never
reaches the outputs before t: they are finite and equal the call on the sequence truncated before t,
for every causal method, on the torch backend and under the Triton interpreter, and both backends
give the same outputs (the same entries non-finite, the finite ones equal).

XAttention and SeerAttention choose key blocks per query block from scores that read every row of
the block (docs/hardening.md, "Causal isolation"), so for them the truncated call is matched by the
rows of the query blocks before t's block; a poisoned v (which no selection reads) leaves every row
before t as in the clean call. sparsed and wersa are non-causal only: nothing to isolate.
"""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.block_mask import BlockMask
from attnzoo.registry import REGISTRY

# the interpreter warns about the NaN arithmetic these inputs are made of
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::RuntimeWarning")]

N, BLOCK = 40, 16  # three query blocks, the last one ragged
CAUSAL_METHODS = [name for name in REGISTRY.names() if attnzoo.info(name).supports.causal]
SELECTS_PER_BLOCK = {"xattention", "seerattention"}  # block choice from scores over all rows of a block
PARAMS = {
    "block_sparse": dict(block_size=BLOCK),
    "xattention": dict(block_size=BLOCK, stride=4, threshold=0.6),
    "s2": dict(block_size=BLOCK, local_blocks=1, vert_stride=2),
    # last_blocks_dense makes the last query blocks of a call dense, so a shorter call has other dense rows
    "seerattention": dict(block_size=BLOCK, topk_ratio=0.5, last_blocks_dense=0),
}
HEAD_DIM = {"based": 8}  # BASED's Taylor features grow as D^2: 45 features instead of 153 under the interpreter


def _inputs(name: str, seed: int):
    """q (1, 2, N, D), k, v (1, 1, N, D) (GQA) and the method's finite call keywords."""
    gen = torch.Generator().manual_seed(seed)
    d = HEAD_DIM.get(name, 16)
    q = torch.randn(1, 2, N, d, generator=gen)
    k, v = (torch.randn(1, 1, N, d, generator=gen) for _ in range(2))
    params = dict(PARAMS.get(name, {}))
    module = attnzoo.info(name).load_module()
    if name not in PARAMS and hasattr(module, "example_kwargs"):
        torch.manual_seed(seed)
        params.update(module.example_kwargs(q, k, v, causal=True))
    if name == "block_sparse":
        blocks = -(-N // BLOCK)
        chosen = torch.rand(1, 2, blocks, blocks, generator=gen) < 0.5
        params["block_mask"] = BlockMask(chosen | torch.eye(blocks, dtype=torch.bool), BLOCK)
    return (q, k, v), params


def _truncated(params: dict, t: int) -> dict:
    """The call keywords for the sequence cut before t (per-token inputs and block masks sliced)."""
    cut = dict(params)
    if "g" in cut:
        cut["g"] = cut["g"][:, :, :t]
    if "bias_factors" in cut:
        cut["bias_factors"] = tuple(f[:, :, :t] for f in cut["bias_factors"])
    if "block_mask" in cut:
        blocks = -(-t // BLOCK)
        cut["block_mask"] = BlockMask(cut["block_mask"].mask[..., :blocks, :blocks].clone(), BLOCK)
    return cut


def _poisoned(tensors, which: int, t: int, value: float, every: int):
    """q, k, v with `value` at position t of tensor `which`, in every `every`-th channel."""
    out = [x.clone() for x in tensors]
    out[which][:, :, t, ::every] = value
    return out


@pytest.mark.parametrize("name", CAUSAL_METHODS)
@settings(max_examples=3)
@given(t=st.integers(1, N - 1), which=st.integers(0, 2), value=st.sampled_from([math.nan, math.inf, -math.inf]),
       every=st.sampled_from([1, 3]), seed=st.integers(0, 2**16))
@example(t=5, which=2, value=math.nan, every=1, seed=0)  # the case: SDPA spread a NaN value to every row
@example(t=17, which=1, value=math.inf, every=3, seed=1)
def test_a_nonfinite_token_never_reaches_earlier_outputs(name, t, which, value, every, seed):
    clean, params = _inputs(name, seed)
    poisoned = _poisoned(clean, which, t, value, every)
    method = attnzoo.get(name, **params)
    outputs = {backend: method(*poisoned, causal=True, backend=backend) for backend in ("torch", "triton")}
    truncated = attnzoo.get(name, **_truncated(params, t))(*(x[:, :, :t] for x in clean), causal=True,
                                                          backend="torch")
    exact_rows = t // BLOCK * BLOCK if name in SELECTS_PER_BLOCK else t
    for backend, out in outputs.items():
        assert torch.isfinite(out[:, :, :t]).all(), backend
        torch.testing.assert_close(out[:, :, :exact_rows], truncated[:, :, :exact_rows], rtol=1e-5, atol=1e-5)
    if name in SELECTS_PER_BLOCK and which == 2:
        want = method(*clean, causal=True, backend="torch")
        torch.testing.assert_close(outputs["torch"][:, :, :t], want[:, :, :t], rtol=1e-5, atol=1e-5)
    by_torch, by_triton = outputs["torch"], outputs["triton"]
    finite = torch.isfinite(by_torch)
    assert torch.equal(finite, torch.isfinite(by_triton))
    torch.testing.assert_close(by_triton[finite], by_torch[finite], rtol=1e-4, atol=1e-5)
