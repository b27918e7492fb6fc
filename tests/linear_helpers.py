"""Shared by the linear-method tests: tolerance, backends, relative error, random inputs."""

import torch

FP32_TOL = 2e-5
BACKENDS = ["triton", "torch"]


def rel_err(got, want) -> float:
    """Max error over the largest reference value."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max()).item()


def qkv(B=1, H=2, N=37, D=16, Dv=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, N, d, generator=gen) for d in (D, D, Dv))
