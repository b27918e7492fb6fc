"""LAWCAT (reconstruction): identity conv + no gate == normalised linear attention, constant v -> v,
conv causality, chunked == float64 recurrence with gradients to q, k, v, g and the adapter's
parameters, and decoding steps (with the conv windows) == the full call."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import linear_state
from attnzoo.methods import lawcat as lawcat_module
from attnzoo.methods.lawcat import LAWCATAdapter, causal_depthwise_conv
from attnzoo.reference import exact_output
from attnzoo.reference.lawcat import causal_depthwise_conv as loop_conv
from linear_helpers import BACKENDS, FP32_TOL, rel_err, qkv


def _exact(q, k, v, *, feature_map="elu1", **inputs):
    """The token-by-token normalised gated recurrence on conv'd features (attnzoo.reference.lawcat)."""
    return exact_output("lawcat", q, k, v, causal=True, scale=q.shape[-1] ** -0.5,
                        params={"feature_map": feature_map, "eps": 1e-6}, inputs=inputs)


def trained_adapter(H=2, D=16, seed=0):
    """An adapter moved away from its identity initialisation, as after some training."""
    torch.manual_seed(seed)
    adapter = LAWCATAdapter(H, D)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return adapter


def test_conv_matches_loop_and_is_causal():
    x = torch.randn(2, 3, 11, 4, dtype=torch.float64)
    weight = torch.randn(3, 4, 4, dtype=torch.float64)
    y = causal_depthwise_conv(x, weight)
    assert (y - loop_conv(x, weight)).abs().max() < 1e-12
    bumped = x.clone()
    bumped[:, :, 6:] += 1.0
    assert torch.equal(causal_depthwise_conv(bumped, weight)[:, :, :6], y[:, :, :6])
    identity = torch.zeros(3, 4, 4, dtype=torch.float64)
    identity[..., -1] = 1.0
    assert torch.equal(causal_depthwise_conv(x, identity), x)


@pytest.mark.parametrize("backend", BACKENDS)
def test_identity_conv_without_gate_is_normalised_linear_attention(backend):
    q, k, v = qkv(seed=1)
    adapter = LAWCATAdapter(2, 16)
    out = attnzoo.get("lawcat", chunk_size=16)(q, k, v, causal=True, conv_q=adapter.conv_q, conv_k=adapter.conv_k,
                                                backend=backend)
    phi_q, phi_k = (F.elu(x.double()) + 1 for x in (q, k))
    scores = torch.tril(phi_q @ phi_k.transpose(-1, -2))
    assert rel_err(out, scores @ v.double() / (scores.sum(-1, keepdim=True) + 1e-6)) < FP32_TOL
    constant = torch.full_like(v, -1.3)
    got = attnzoo.get("lawcat", chunk_size=16)(q, k, constant, causal=True, backend=backend, **trained_adapter()(q, k))
    assert rel_err(got, constant) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_reference_with_adapter_gradients(backend):
    q, k, v = qkv(seed=2)
    weight = torch.randn(1, 2, 37, 16, dtype=torch.float64)

    def grads(dtype, run):
        adapter = trained_adapter(seed=3).to(dtype)
        leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
        out = run(*leaves, **adapter(*leaves[:2]))
        (out.double() * weight).sum().backward()
        return out, [x.grad for x in leaves] + [p.grad for p in adapter.parameters()]

    out, got = grads(torch.float32, lambda q, k, v, **kw: attnzoo.get("lawcat", chunk_size=16)(
        q, k, v, causal=True, backend=backend, **kw))
    want_out, want = grads(torch.float64, lambda q, k, v, **kw: _exact(q, k, v, **kw))
    assert rel_err(out, want_out) < FP32_TOL
    assert len(got) == 3 + 4  # dq, dk, dv, conv_q, conv_k, gate weight, gate bias
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-4  # conv + ELU in fp32 add rounding before the kernel


@given(batch=st.integers(1, 2), heads=st.integers(1, 2), n=st.integers(1, 40), taps=st.integers(1, 4),
       gate=st.sampled_from([None, "head", "channel"]), feature_map=st.sampled_from(["elu1", "relu"]),
       backend=st.sampled_from(BACKENDS), seed=st.integers(0, 2**31 - 1))
@settings()
def test_equals_the_oracle(batch, heads, n, taps, gate, feature_map, backend, seed):
    q, k, v = qkv(B=batch, H=heads, N=n, seed=seed)
    if feature_map == "relu":  # keep every row's normaliser away from 0: relu features of |x| + 0.1
        q, k = q.abs() + 0.1, k.abs() + 0.1
    gen = torch.Generator().manual_seed(seed + 1)
    inputs = {name: torch.rand(heads, 16, taps, generator=gen) for name in ("conv_q", "conv_k")}
    if gate is not None:
        shape = (batch, heads, n) if gate == "head" else (batch, heads, n, 16)
        inputs["g"] = F.logsigmoid(torch.randn(shape, generator=gen) + 2)
    out = attnzoo.get("lawcat", chunk_size=16, feature_map=feature_map)(q, k, v, causal=True, backend=backend,
                                                                        **inputs)
    assert rel_err(out, _exact(q, k, v, feature_map=feature_map, **inputs), floor=1.0) < FP32_TOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_future_does_not_change_the_past(backend):
    q, k, v = qkv(seed=4)
    adapter = trained_adapter(seed=4)
    fn = attnzoo.get("lawcat", chunk_size=16)
    before = fn(q, k, v, causal=True, backend=backend, **adapter(q, k))
    t = 17
    bumped = [x.clone() for x in (q, k, v)]
    for x in bumped:
        x[:, :, t + 1:] += torch.randn_like(x[:, :, t + 1:])
    after = fn(*bumped, causal=True, backend=backend, **adapter(*bumped[:2]))
    assert torch.equal(after[:, :, :t + 1], before[:, :, :t + 1])
    assert not torch.allclose(after[:, :, t + 1:], before[:, :, t + 1:])


@pytest.mark.parametrize("per_channel_gate", [False, True])
def test_decoding_steps_equal_the_full_call(per_channel_gate):
    q, k, v = qkv(N=11, seed=5)
    with torch.no_grad():
        kwargs = trained_adapter(seed=5)(q, k)
    if per_channel_gate:
        kwargs["g"] = F.logsigmoid(torch.randn_like(q))
    full = attnzoo.get("lawcat")(q, k, v, causal=True, backend="torch", **kwargs)
    step, state, outs = linear_state("lawcat"), None, []
    for t in range(q.shape[2]):
        o_t, state = step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, g_t=kwargs["g"][:, :, t:t + 1],
                          conv_q=kwargs["conv_q"], conv_k=kwargs["conv_k"])
        outs.append(o_t)
    assert state.q_window.shape == (1, 2, 3, 16)
    assert rel_err(torch.cat(outs, dim=2), full) < FP32_TOL


def test_invalid_calls_raise_and_say_why():
    q, k, v = qkv(N=8)
    fn = attnzoo.get("lawcat")
    with pytest.raises(ValueError, match="causal"):
        fn(q, k, v, causal=False)
    with pytest.raises(ValueError, match="causal only"):
        lawcat_module.lawcat(q, k, v, causal=False, scale=1.0, backend="torch")
    with pytest.raises(ValueError, match=r"conv_q has shape \(3, 16, 4\)"):
        fn(q, k, v, causal=True, conv_q=torch.zeros(3, 16, 4))
    with pytest.raises(ValueError, match="feature_map"):
        fn(q, k, v, causal=True, feature_map="softmax")
    with pytest.raises(ValueError, match="must be finite and <= 0"):
        fn(q, k, v, causal=True, g=torch.rand(1, 2, 8) + 0.1)
    with pytest.raises(ValueError, match="conv_k must hold at least one tap"):
        fn(q, k, v, causal=True, conv_k=torch.zeros(2, 16, 0))
