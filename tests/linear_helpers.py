"""Shared by the linear-method tests: tolerance, backends, relative error, random inputs."""

import torch

FP32_TOL = 2e-5
BACKENDS = ["triton", "torch"]


def rel_err(got, want, floor: float = 0.0) -> float:
    """Max error over the largest reference value (at least `floor`, for outputs that may be all 0)."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(floor)).item()


def qkv(B=1, H=2, N=37, D=16, Dv=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, d, generator=gen) for d in (D, D, Dv))
