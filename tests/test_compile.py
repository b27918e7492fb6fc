"""torch.compile: every registry method runs compiled with dynamic shapes (dynamic=True) and at a second
sequence length, equal to eager (gradients too where they are cheap to trace); the exact and
block-sparse methods compile without a graph break (issue 16, item 2).

Compiled with backend="aot_eager" (Dynamo's tracing, fake-tensor shape propagation and AOT autograd,
which is where data-dependent code fails; Inductor's code generation adds minutes per graph on CPU
and nothing attnzoo controls). The methods whose gradients are not checked here (FORWARD_ONLY) compile
with backend="eager": Dynamo's tracing and fake-tensor propagation with dynamic shapes, without the
AOT pass that only their backward would need (it costs three to four times the tracing on CPU). The
graph breaks of every method are listed in docs/hardening.md.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import attnzoo
from attnzoo.block_mask import BlockMask
from attnzoo.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 16
LENGTHS = (32, 48)  # the second one must not retrace into an error
PARAMS = {
    "block_sparse": dict(block_size=BLOCK),
    "xattention": dict(block_size=BLOCK, stride=4, threshold=0.7),
    "seerattention": dict(block_size=BLOCK, topk_ratio=0.5),
    "s2": dict(block_size=BLOCK, local_blocks=1, vert_stride=2),
    "sparsed": dict(block_size=BLOCK, select=0.3, skip=0.0),
}
# Their backward is an op's backward traced for other methods (the block-sparse flash op through
# block_sparse and s2, the linear op through gla, based and lawcat); tracing it again behind their
# selection or feature maps costs tens of seconds on CPU.
FORWARD_ONLY = {"xattention", "seerattention", "sparsed", "wersa"}
FLASH_FAMILY = [name for name in REGISTRY.names() if attnzoo.info(name).family in ("exact", "sparse")]


def _case(name: str, n: int, *, grad: bool):
    """q, k, v (1, 2, n, 16) and the method's call keywords (extra inputs made eagerly, outside the
    compiled region, as a model would hold them)."""
    gen = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen, requires_grad=grad) for _ in range(3))
    info = attnzoo.info(name)
    causal = info.supports.causal
    params = dict(PARAMS.get(name, {}))
    if name not in PARAMS and hasattr(info.load_module(), "example_kwargs"):
        torch.manual_seed(n)
        params.update(info.load_module().example_kwargs(q.detach(), k.detach(), v.detach(), causal=causal))
    if name == "block_sparse":
        blocks = -(-n // BLOCK)
        chosen = torch.rand(1, 2, blocks, blocks, generator=gen) < 0.5
        params["block_mask"] = BlockMask(chosen | torch.eye(blocks, dtype=torch.bool), BLOCK)
    return (q, k, v), params, causal


@pytest.mark.parametrize("name, extra", [*((name, {}) for name in REGISTRY.names()),
                                         ("dense", dict(window_size=(8, 0), softcap=5.0))])
def test_compiled_with_dynamic_shapes_equals_eager(name, extra):
    """Outputs (and gradients) equal to eager at two lengths; no graph break for the exact and
    block-sparse family (Dynamo's graph-break counter stays empty)."""
    torch._dynamo.reset()
    counters.clear()
    grad = name not in FORWARD_ONLY

    method = attnzoo.get(name, **extra)

    def call(q, k, v, causal, params):
        return method(q, k, v, causal=causal, backend="torch", **params)

    compiled = torch.compile(call, backend="aot_eager" if grad else "eager", dynamic=True)
    for n in LENGTHS:
        qkv, params, causal = _case(name, n, grad=grad)
        got, want = compiled(*qkv, causal, params), call(*qkv, causal, params)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        if grad:
            for got_grad, want_grad in zip(torch.autograd.grad(got.sum(), qkv), torch.autograd.grad(want.sum(), qkv)):
                torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-6)
    if name in FLASH_FAMILY:
        assert not counters["graph_break"], [reason.splitlines()[0] for reason in counters["graph_break"]]
