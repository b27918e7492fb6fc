"""lawcat's learned feature map (LearnedFeatureMap, through LAWCATAdapter) against a float64 oracle
written here token by token.

LAWCAT (Liu et al., arXiv 2509.18467): the feature map is learned, a linear layer plus a nonlinearity,
shared by q and k and applied after the causal convolution (as issue 13 reports of the official code,
which this repository does not hold). The oracle: q~ = conv(q), k~ = conv(k) (depthwise, causal),
phi(x) = elu(x W_h + b_h) + 1 per head h with the same W, b for q and k, then the normalised gated
recurrence S_t = a_t S_{t-1} + phi(k~_t)^T v_t, z_t = a_t z_{t-1} + phi(k~_t),
o_t = phi(q~_t) S_t / (phi(q~_t) . z_t + eps).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.methods.lawcat import LAWCATAdapter, LearnedFeatureMap

EPS = 1e-6


def conv(x, weight):
    r = weight.shape[-1] - 1
    out = torch.zeros_like(x)
    for t in range(x.shape[2]):
        for j in range(r + 1):
            if t - r + j >= 0:
                out[:, :, t] += weight[None, :, :, j] * x[:, :, t - r + j]
    return out


def learned_phi(x, weight, bias):
    y = torch.einsum("bhnd,hdf->bhnf", x, weight) + bias[None, :, None]
    return torch.where(y > 0, y + 1, torch.exp(torch.clamp(y, max=0)))


def lawcat_oracle(q, k, v, *, conv_q, conv_k, g, weight, bias):
    phi_q, phi_k = learned_phi(conv(q, conv_q), weight, bias), learned_phi(conv(k, conv_k), weight, bias)
    B, H, N, F = phi_q.shape
    S = torch.zeros(B, H, F, v.shape[-1], dtype=torch.float64)
    z = torch.zeros(B, H, F, dtype=torch.float64)
    out = []
    for t in range(N):
        a = torch.exp(g[:, :, t])[..., None]
        S = a[..., None] * S + phi_k[:, :, t, :, None] * v[:, :, t, None, :]
        z = a * z + phi_k[:, :, t]
        num = torch.einsum("bhf,bhfe->bhe", phi_q[:, :, t], S)
        out.append(num / ((phi_q[:, :, t] * z).sum(-1, keepdim=True) + EPS))
    return torch.stack(out, dim=2)


def trained(adapter, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return adapter


@given(seed=st.integers(0, 2**31 - 1), heads=st.integers(1, 2), n=st.integers(1, 40), taps=st.integers(1, 4),
       backend=st.sampled_from(["torch", "triton"]))
@settings()
def test_learned_feature_map_equals_the_oracle_with_its_gradients(seed, heads, n, taps, backend):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, n, 16, generator=gen) for _ in range(3))
    adapter = trained(LAWCATAdapter(heads, 16, kernel_size=taps, learned_feature_map=True), seed)
    inputs = adapter(q, k)
    assert inputs["feature_map"] is adapter.feature_map  # one map, shared by q and k
    out = attnzoo.get("lawcat", chunk_size=16)(q, k, v, causal=True, backend=backend, **inputs)
    weight = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad((out * weight).sum(), (adapter.feature_map.weight, adapter.feature_map.bias))

    p64 = {name: p.detach().double().requires_grad_() for name, p in adapter.named_parameters()}
    g = torch.nn.functional.logsigmoid(torch.einsum("bhnd,hd->bhn", k.double(), p64["gate_weight"])
                                       + p64["gate_bias"][:, None])
    want = lawcat_oracle(q.double(), k.double(), v.double(), conv_q=p64["conv_q"], conv_k=p64["conv_k"], g=g,
                         weight=p64["feature_map.weight"], bias=p64["feature_map.bias"])
    torch.testing.assert_close(out.double(), want, rtol=2e-4, atol=2e-5)
    learned = (p64["feature_map.weight"], p64["feature_map.bias"])
    want_grads = torch.autograd.grad((want * weight.double()).sum(), learned)
    for a, b in zip(got, want_grads):
        torch.testing.assert_close(a.double(), b, rtol=2e-3, atol=2e-4)


def test_identity_initialised_map_starts_as_elu1_and_trains():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 24, 16, generator=gen) for _ in range(3))
    learned = LAWCATAdapter(2, 16, learned_feature_map=True)
    fixed = LAWCATAdapter(2, 16)
    fn = attnzoo.get("lawcat")
    torch.testing.assert_close(fn(q, k, v, causal=True, backend="torch", **learned(q, k)),
                               fn(q, k, v, causal=True, backend="torch", **fixed(q, k)))
    optimizer = torch.optim.Adam(learned.feature_map.parameters(), lr=1e-2)
    target = torch.randn(1, 2, 24, 16, generator=gen)
    losses = []
    for _ in range(5):
        loss = (fn(q, k, v, causal=True, backend="torch", **learned(q, k)) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("make, match", [
    (lambda: LearnedFeatureMap(2, 16, activation="softmax"), "activation"),
    (lambda: attnzoo.get("lawcat")(*torch.randn(3, 1, 2, 8, 16), causal=True, feature_map=3), "feature_map"),
    (lambda: LearnedFeatureMap(2, 16)(torch.randn(1, 3, 8, 16)), "LearnedFeatureMap"),
])
def test_bad_feature_maps_are_rejected(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
