"""GLA through the public API: invariants of METHODS.md (g = 0 is plain linear attention, state
carry, causality, gradients incl. dg and GLAGate's parameters, decoding steps)."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import linear_state
from attnzoo.methods.gla import GLAGate
from attnzoo.reference import exact_output, recurrent_linear_attention
from linear_helpers import BACKENDS, FP32_TOL, rel_err


def qkvg(B=1, H=2, N=37, D=16, Dv=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, N, D, generator=gen)
    v = torch.randn(B, H, N, Dv, generator=gen)
    g = F.logsigmoid(torch.randn(B, H, N, D, generator=gen) + 2.0)
    return q, k, v, g


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_with_state_in_and_out(backend):
    q, k, v, g = qkvg()
    h0 = torch.randn(1, 2, 16, 24)
    out, final = attnzoo.get("gla", chunk_size=16)(q, k, v, causal=True, g=g, initial_state=h0,
                                                   output_final_state=True, backend=backend)
    want, want_final, _ = recurrent_linear_attention(q.double(), k.double(), v.double(), g=g.double(),
                                                     scale=16 ** -0.5, initial_state=h0.double())
    assert out.dtype == q.dtype and final.dtype == torch.float32
    assert rel_err(out, want) < FP32_TOL and rel_err(final, want_final) < FP32_TOL


@given(batch=st.integers(1, 2), heads=st.integers(1, 2), n=st.integers(1, 40), d=st.sampled_from([16, 32]),
       dv=st.sampled_from([16, 24]), gated=st.booleans(), with_state=st.booleans(), scale=st.floats(0.1, 1.0),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**31 - 1))
@settings()
def test_equals_the_oracle(batch, heads, n, d, dv, gated, with_state, scale, backend, seed):
    q, k, v, g = qkvg(batch, heads, n, d, dv, seed=seed)
    inputs = {"g": g if gated else None,
              "initial_state": torch.randn(batch, heads, d, dv, generator=torch.Generator().manual_seed(seed + 1))
              if with_state else None}
    out = attnzoo.get("gla", chunk_size=16)(q, k, v, causal=True, scale=scale, backend=backend, **inputs)
    want = exact_output("gla", q, k, v, causal=True, scale=scale, params={"chunk_size": 16}, inputs=inputs)
    assert rel_err(out, want, floor=1.0) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gate_is_plain_causal_linear_attention(backend):
    q, k, v, _ = qkvg(seed=1)
    gla = attnzoo.get("gla", chunk_size=16)
    plain = torch.einsum("bhnd,bhnd...->bhn...", q * 0.25, (k[..., :, None] * v[..., None, :]).cumsum(2))
    assert rel_err(gla(q, k, v, causal=True, g=torch.zeros_like(q), backend=backend), plain) < FP32_TOL
    assert rel_err(gla(q, k, v, causal=True, backend=backend), plain) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_carry_two_halves_equal_one_call(backend):
    q, k, v, g = qkvg(N=40, seed=2)
    gla = attnzoo.get("gla", chunk_size=16)
    whole, whole_state = gla(q, k, v, causal=True, g=g, output_final_state=True, backend=backend)
    cut = 21
    first, mid_state = gla(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], causal=True, g=g[:, :, :cut],
                           output_final_state=True, backend=backend)
    second, end_state = gla(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], causal=True, g=g[:, :, cut:],
                            initial_state=mid_state, output_final_state=True, backend=backend)
    assert rel_err(torch.cat([first, second], dim=2), whole) < FP32_TOL
    assert rel_err(end_state, whole_state) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_future_does_not_change_the_past(backend):
    q, k, v, g = qkvg(seed=3)
    gla = attnzoo.get("gla", chunk_size=16)
    before = gla(q, k, v, causal=True, g=g, backend=backend)
    t = 19
    bumped = [x.clone() for x in (q, k, v, g)]
    for x in bumped[:3]:
        x[:, :, t + 1:] += torch.randn_like(x[:, :, t + 1:])
    bumped[3][:, :, t + 1:] = -torch.rand_like(g[:, :, t + 1:])
    after = gla(*bumped[:3], causal=True, g=bumped[3], backend=backend)
    assert torch.equal(after[:, :, :t + 1], before[:, :, :t + 1])
    assert not torch.allclose(after[:, :, t + 1:], before[:, :, t + 1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gate_module_gradients_match_reference(backend):
    """Gradients reach q, k, v and GLAGate's parameters through the kernel exactly as through the
    float64 recurrence."""
    torch.manual_seed(4)
    B, H, N, D, hidden = 1, 2, 33, 16, 24
    gate = GLAGate(hidden, H, D, low_rank=8)
    x = torch.randn(B, N, hidden)
    q, k, v, _ = qkvg(B, H, N, D, D, seed=4)
    weight = torch.randn(B, H, N, D, dtype=torch.float64)

    def grads(dtype, run):
        gate.zero_grad()
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        g = gate.to(dtype)(x.to(dtype))
        assert g.shape == (B, H, N, D) and (g <= 0).all()
        (run(*leaves, g).double() * weight).sum().backward()
        return [t.grad.clone() for t in leaves] + [p.grad.clone() for p in gate.parameters()]

    got = grads(torch.float32, lambda q, k, v, g: attnzoo.get("gla", chunk_size=16)(q, k, v, causal=True, g=g,
                                                                                   backend=backend))
    want = grads(torch.float64, lambda q, k, v, g: recurrent_linear_attention(q, k, v, g=g, scale=D ** -0.5)[0])
    assert len(got) == 3 + 3  # dq, dk, dv, and the gate's down weight, up weight, up bias
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4  # the fp32 gate module itself contributes rounding here


def test_decoding_steps_equal_the_full_call():
    q, k, v, g = qkvg(N=12, seed=5)
    h0 = torch.randn(1, 2, 16, 24)
    full, full_state = attnzoo.get("gla")(q, k, v, causal=True, g=g, initial_state=h0, output_final_state=True,
                                          backend="torch")
    step, state, outs = linear_state("gla"), h0, []
    for t in range(q.shape[2]):
        o_t, state = step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, g_t=g[:, :, t:t + 1])
        outs.append(o_t)
    assert rel_err(torch.cat(outs, dim=2), full) < FP32_TOL
    assert rel_err(state, full_state) < FP32_TOL


def test_invalid_calls_raise_and_say_why():
    q, k, v, g = qkvg(N=8)
    gla = attnzoo.get("gla")
    with pytest.raises(ValueError, match="causal"):
        gla(q, k, v, causal=False, g=g)
    with pytest.raises(ValueError, match="causal"):
        attnzoo.methods.gla.gla(q, k, v, causal=False, scale=1.0, backend="torch")
    with pytest.raises(ValueError, match=r"g has shape \(1, 2, 8, 8\)"):
        gla(q, k, v, causal=True, g=g[..., :8])
    with pytest.raises(ValueError, match="g holds log forget gates and must be finite and <= 0"):
        gla(q, k, v, causal=True, g=-g)
    for bad in (float("-inf"), float("nan")):  # the chunked form would turn either into NaN outputs
        with pytest.raises(ValueError, match="must be finite and <= 0"):
            gla(q, k, v, causal=True, g=g.index_fill(2, torch.tensor([3]), bad))
    with pytest.raises(ValueError, match="g_t holds log forget gates"):
        attnzoo.linear_state("gla")(q[:, :, :1], k[:, :, :1], v[:, :, :1], None, g_t=-g[:, :, :1])
    with pytest.raises(TypeError, match="initial_state has dtype torch.float64"):
        gla(q, k, v, causal=True, initial_state=torch.zeros(1, 2, 16, 24, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"g has shape \(1, 2, 8, 16\); expected \(1, 1, 8, 16\)"):
        gla(q, k[:, :1], v[:, :1], causal=True, g=g)  # GQA: the gates are the kv head's
    with pytest.raises(ValueError, match="one length"):
        gla(q, k[:, :, :5], v[:, :, :5], causal=True)
    with pytest.raises(ValueError, match="fla"):
        gla(q, k, v, causal=True, backend="fla")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_our_kernel_and_fla_both_match_the_reference_on_gpu(dtype):
    """Cross-check of backend="triton" and backend="fla" (fla's chunk_gla) on CUDA: both against the
    float64 recurrence, outputs and dq, dk, dv, dg."""
    q, k, v, g = qkvg(B=2, H=4, N=1000, D=64, Dv=64, seed=6)
    weight = torch.randn(2, 4, 1000, 64, dtype=torch.float64)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v, g)]
    want = recurrent_linear_attention(*ref_leaves[:3], g=ref_leaves[3], scale=64 ** -0.5)[0]
    (want * weight).sum().backward()
    tol = 2e-3 if dtype == torch.float32 else 3e-2  # fla may use tf32 for fp32 inputs
    for backend in ("triton", "fla"):
        leaves = [x.cuda().to(dtype if i < 3 else torch.float32).requires_grad_() for i, x in enumerate((q, k, v, g))]
        out = attnzoo.get("gla")(*leaves[:3], causal=True, g=leaves[3], backend=backend)
        (out.double() * weight.cuda()).sum().backward()
        assert rel_err(out.cpu(), want) < tol, backend
        for got, ref in zip(leaves, ref_leaves):
            assert rel_err(got.grad.cpu(), ref.grad) < tol, backend
