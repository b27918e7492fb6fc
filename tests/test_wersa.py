"""wersa's (removed) bandwidth and causal refusal, against a float64 oracle of the formula of the WERSA module
we could read (research/linear_methods.md §4.2: phi(x) = relu(x Omega / beta) / sqrt(m), normalised
non-causal linear attention with eps 1e-6; the official repository holds only a README)."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo


def module_formula(q, k, v, omega, beta, eps=1e-6):
    """gains 1: o = phi(q~) (phi(k~)^T v) / (phi(q~) . sum phi(k~) + eps), q~ = gelu(q), k~ = gelu(k)."""
    m = omega.shape[-1]
    phi_q, phi_k = (torch.relu(F.gelu(x) @ omega / beta) / math.sqrt(m) for x in (q, k))
    num = phi_q @ (phi_k.transpose(-1, -2) @ v)
    return num / (phi_q @ phi_k.sum(-2, keepdim=True).transpose(-1, -2) + eps)


def test_the_module_bandwidth_cancels_so_attnzoo_has_none():
    """relu is positively homogeneous: phi at bandwidth b is phi at 1 divided by b, so numerator and
    denominator scale alike and only eps tells bandwidths apart. attnzoo therefore has no bandwidth:
    its output equals the module's formula at any bandwidth."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen, dtype=torch.float64) for _ in range(3))
    omega = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    exact_1, exact_7 = module_formula(q, k, v, omega, 1.0, eps=0.0), module_formula(q, k, v, omega, 7.0, eps=0.0)
    torch.testing.assert_close(exact_1, exact_7, rtol=1e-12, atol=1e-12)
    out = attnzoo.get("wersa", num_features=64, seed=3)(q.float(), k.float(), v.float(), backend="torch")
    drawn = torch.randn(16, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)  # Omega from seed 3
    want = module_formula(q, k, v, drawn.float().double(), 7.0)
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-5)


def test_causal_calls_are_refused_with_the_reason():
    q = k = v = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="later tokens"):
        attnzoo.get("wersa")(q, k, v, causal=True)
