"""Grouped-query attention for the linear methods (issue 16, item 9): gla, based, lawcat and wersa take
k, v and their gates per kv head, shared by the Hq / Hk query heads of a group.

Forward and backward (dq, dk, dv and the gates' gradients) of a GQA call equal the float64 oracles
of attnzoo/reference, which repeat the kv heads by definition, on both backends (the Triton
interpreter on tiny shapes). The kernels never repeat k or v: the op receives Hk heads (checked
below), and inside it both implementations fold a group's query heads onto their kv head
(torch_impl/linear.py `_grouped`, kernels/linear.py by index arithmetic). N != M has no meaning for
these methods (one recurrence, or one wavelet filter, along one sequence) and is refused naming
both lengths.
"""

import pytest
import torch
import torch.nn.functional as F

import attnzoo
import attnzoo.ops.linear as linear_op
from attnzoo.reference import exact_output
from linear_helpers import BACKENDS, rel_err

B, HQ, HK, N, DV = 1, 4, 2, 24, 16
HEAD_DIM = {"based": 8}  # BASED's Taylor features grow as D^2: a small q/k dim, as the paper uses
PARAMS = {"wersa": {"num_features": 32}}  # fewer random features: the interpreter's cost grows with them
GRAD_TOL = 1e-4


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def method_inputs(method: str, seed: int) -> dict:
    """The extra inputs of a GQA call, per kv head where the method shares them (gates, conv_k)."""
    d = HEAD_DIM.get(method, 16)
    gen = _gen(seed + 1)
    if method == "gla":
        return {"g": F.logsigmoid(torch.randn(B, HK, N, d, generator=gen) + 2.0)}
    if method == "lawcat":
        return {"g": F.logsigmoid(torch.randn(B, HK, N, generator=gen) + 2.0),
                "conv_q": torch.randn(HQ, d, 3, generator=gen) / 2, "conv_k": torch.randn(HK, d, 3, generator=gen) / 2}
    if method == "wersa":
        return {"gains": torch.rand(3, generator=gen) + 0.5}
    return {}


def gqa_case(method: str, seed: int = 0):
    d = HEAD_DIM.get(method, 16)
    gen = _gen(seed)
    q = torch.randn(B, HQ, N, d, generator=gen)
    k, v = torch.randn(B, HK, N, d, generator=gen), torch.randn(B, HK, N, DV, generator=gen)
    return q, k, v, method_inputs(method, seed)


def causal_of(method: str) -> bool:
    return not attnzoo.info(method).supports.non_causal


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["gla", "based", "lawcat", "wersa"])
def test_gqa_forward_and_backward_equal_the_float64_oracle(method, backend):
    q, k, v, inputs = gqa_case(method)
    causal, scale = causal_of(method), q.shape[-1] ** -0.5
    do = torch.randn(B, HQ, N, DV, generator=_gen(7))
    leaves = {name: t.clone().requires_grad_() for name, t in {"q": q, "k": k, "v": v, **inputs}.items()}
    oracle_leaves = {name: t.detach().double().requires_grad_() for name, t in leaves.items()}

    params = {**attnzoo.info(method).params, "chunk_size": 16, **PARAMS.get(method, {})}
    out = attnzoo.get(method, **params)(leaves["q"], leaves["k"], leaves["v"], causal=causal, backend=backend,
                                        **{name: leaves[name] for name in inputs})
    want = exact_output(method, oracle_leaves["q"], oracle_leaves["k"], oracle_leaves["v"], causal=causal,
                        scale=scale, params=params, inputs={name: oracle_leaves[name] for name in inputs})
    (out * do).sum().backward()
    (want * do.double()).sum().backward()

    assert out.shape == (B, HQ, N, DV) and rel_err(out, want, floor=1.0) < 2e-5
    for name, leaf in leaves.items():
        got, expected = leaf.grad, oracle_leaves[name].grad
        assert got.shape == leaf.shape, name
        assert rel_err(got, expected, floor=1e-3) < GRAD_TOL, f"d{name}: {rel_err(got, expected, floor=1e-3):.2e}"


@pytest.mark.parametrize("method", ["gla", "based", "lawcat", "wersa"])
def test_the_op_receives_kv_heads_not_repeated_ones(method, monkeypatch):
    seen = []
    original = linear_op.linear_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape[1], k.shape[1], v.shape[1], None if kwargs.get("g") is None else kwargs["g"].shape[1]))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(linear_op, "linear_attention", spy)
    q, k, v, inputs = gqa_case(method)
    attnzoo.get(method)(q, k, v, causal=causal_of(method), backend="torch", **inputs)
    gate_heads = HK if method in ("gla", "lawcat") else None
    assert seen == [(HQ, HK, HK, gate_heads)]


@pytest.mark.parametrize("method", ["gla", "based", "lawcat", "wersa"])
def test_a_gqa_call_equals_the_call_on_repeated_kv_heads(method):
    """The group shares its kv head: repeating k, v (and the kv-side inputs) to Hq heads changes nothing."""
    q, k, v, inputs = gqa_case(method, seed=3)
    repeat = HQ // HK
    repeated = {name: t.repeat_interleave(repeat, dim=1) if name in ("g",) else
                t.repeat_interleave(repeat, dim=0) if name == "conv_k" else t for name, t in inputs.items()}
    fn = attnzoo.get(method, chunk_size=16)
    causal = causal_of(method)
    got = fn(q, k, v, causal=causal, backend="torch", **inputs)
    want = fn(q, k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1), causal=causal,
              backend="torch", **repeated)
    assert rel_err(got, want, floor=1.0) < 2e-6


@pytest.mark.parametrize("method", ["gla", "based", "lawcat", "wersa"])
def test_n_not_equal_m_is_refused_naming_both_lengths(method):
    d = HEAD_DIM.get(method, 16)
    q, k, v = torch.randn(B, HQ, 24, d), torch.randn(B, HK, 16, d), torch.randn(B, HK, 16, DV)
    with pytest.raises(ValueError, match=r"(?s)q length 24.*k length 16"):
        attnzoo.get(method)(q, k, v, causal=causal_of(method), backend="torch")
