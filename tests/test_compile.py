"""torch.compile: the exact and block-sparse methods run compiled with dynamic shapes and with a second
sequence length, equal to eager; the flash op is a pair of custom ops, so dense has no graph break.

Compiled with backend="aot_eager" (Dynamo's tracing, fake-tensor shape propagation and AOT autograd,
which is where data-dependent code fails; Inductor's code generation adds minutes per graph on CPU
and nothing attnzoo controls). The graph breaks per method are listed in docs/testing.md."""

import pytest
import torch
import torch._dynamo

import attnzoo
from attnzoo import masks

SPARSE = {
    "xattention": dict(block_size=16, stride=4, threshold=0.7),
    "seerattention": dict(block_size=16, topk_ratio=0.5),
    "s2": dict(block_size=16, local_blocks=1, vert_stride=2),
    "sparsed": dict(block_size=16, select=0.3),
}


def _call(name, params):
    method = attnzoo.get(name, **params)
    causal = name != "sparsed"

    def run(q, k, v):
        extra = {}
        if name == "block_sparse":
            extra["block_mask"] = masks.random(q.shape[2], k.shape[2], 0.5, 16, heads=q.shape[1], seed=0)
        return method(q, k, v, causal=causal, backend="torch", **extra)

    return run


@pytest.mark.parametrize("name, params", [("dense", {}), ("dense", dict(window_size=(8, 0), softcap=5.0)),
                                          ("block_sparse", {}), *SPARSE.items()])
def test_compiled_with_dynamic_shapes_equals_eager(name, params):
    torch._dynamo.reset()
    run = _call(name, params)
    compiled = torch.compile(run, backend="aot_eager", dynamic=True)
    for n in (48, 80):  # a second length must not retrace into an error
        q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for _ in range(3))
        out = compiled(q, k, v)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        want = run(q, k, v)
        want_grads = torch.autograd.grad(want.sum(), (q, k, v))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
        for got, expected in zip(grads, want_grads):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("params", [{}, dict(window_size=(8, 0), return_lse=True)])
def test_dense_compiles_without_a_graph_break(params):
    torch._dynamo.reset()
    method = attnzoo.get("dense", **params)
    q, k, v = (torch.randn(1, 2, 40, 16) for _ in range(3))
    explained = torch._dynamo.explain(lambda q, k, v: method(q, k, v, causal=True, backend="torch"))(q, k, v)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
