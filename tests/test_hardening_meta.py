"""Every shipped method runs on the meta device (issue 16, item 8): with q, k, v and the extra inputs
of the method's `example_kwargs` (what `attnzoo check` feeds it) all on "meta", the call returns meta
tensors of the right shapes (outputs, block masks, gradients). Values are never read there: the
checks that read them (finite gates, NaN biases) skip meta tensors, and block selection is built
from shapes alone (no `nonzero`, no boolean indexing)."""

import pytest
import torch

import attnzoo

B, HQ, N, D, DV = 2, 4, 48, 16, 24


def shipped_methods() -> list[str]:
    return [name for name in attnzoo.list_methods() if attnzoo.info(name).fn_path.startswith("attnzoo.methods.")]


def cases():
    for method in shipped_methods():
        supports = attnzoo.info(method).supports
        for causal in [c for c, ok in ((True, supports.causal), (False, supports.non_causal)) if ok]:
            yield method, causal


def meta_inputs(method: str):
    """q (B, Hq, N, D), k (B, Hk, M, D), v (B, Hk, M, Dv) on meta; GQA where supported, M != N where the
    method has a meaning for it (not the linear family, which runs along one sequence)."""
    info = attnzoo.info(method)
    kv_heads = 2 if info.supports.gqa else HQ
    m = N if info.family == "linear" else N + 16
    return (torch.empty(B, HQ, N, D, device="meta"), torch.empty(B, kv_heads, m, D, device="meta"),
            torch.empty(B, kv_heads, m, DV, device="meta"))


def example_kwargs(method: str, q, k, v, causal: bool) -> dict:
    hook = getattr(attnzoo.info(method).load_module(), "example_kwargs", None)
    return hook(q, k, v, causal=causal) if hook else {}


@pytest.mark.parametrize("method, causal", list(cases()), ids=str)
def test_meta_inputs_give_meta_outputs_of_the_right_shape(method, causal):
    q, k, v = meta_inputs(method)
    kwargs = example_kwargs(method, q, k, v, causal)
    out = attnzoo.get(method)(q, k, v, causal=causal, **kwargs)
    assert out.device.type == "meta" and out.dtype == q.dtype and out.shape == (B, HQ, N, DV)


@pytest.mark.parametrize("method, causal", [(m, c) for m, c in cases()
                                            if "return_block_mask" in attnzoo.info(m).supports.outputs], ids=str)
def test_the_returned_block_mask_is_on_meta_with_one_row_per_query_block(method, causal):
    q, k, v = meta_inputs(method)
    kwargs = example_kwargs(method, q, k, v, causal)
    out, block_mask = attnzoo.get(method)(q, k, v, causal=causal, return_block_mask=True, **kwargs)
    block_q, block_k = block_mask.block_size
    assert out.shape == (B, HQ, N, DV) and block_mask.mask.device.type == "meta"
    assert block_mask.shape[-2:] == (-(-N // block_q), -(-k.shape[2] // block_k))


@pytest.mark.parametrize("method, causal", list(cases()), ids=str)
def test_gradients_on_meta_have_the_inputs_shapes(method, causal):
    q, k, v = (t.requires_grad_() for t in meta_inputs(method))
    kwargs = example_kwargs(method, q.detach(), k.detach(), v.detach(), causal)
    attnzoo.get(method)(q, k, v, causal=causal, **kwargs).sum().backward()
    for t in (q, k, v):
        assert t.grad.device.type == "meta" and t.grad.shape == t.shape


def test_meta_gates_and_biases_are_not_read():
    """The value checks (log gates <= 0, finite, no NaN) skip meta tensors instead of calling .item()."""
    q, k, v = (torch.empty(1, 2, 32, 16, device="meta") for _ in range(3))
    g = torch.empty(1, 2, 32, 16, device="meta")
    assert attnzoo.get("gla")(q, k, v, causal=True, g=g).device.type == "meta"
    assert attnzoo.get("lawcat")(q, k, v, causal=True, g=g[..., 0]).device.type == "meta"
    bias = torch.empty(1, 2, 32, 32, device="meta")
    assert attnzoo.get("dense")(q, k, v, bias=bias).device.type == "meta"
    assert attnzoo.get("flashbias")(q, k, v, bias_factors=(bias[..., :4], bias[..., :4])).device.type == "meta"
    gate = torch.empty(1, 2, 1, 1, device="meta")
    assert attnzoo.get("seerattention")(q, k, v, gate=gate).device.type == "meta"
