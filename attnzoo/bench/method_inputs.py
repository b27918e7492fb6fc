"""The extra inputs the sweep gives methods that take more than q, k, v (docs/benchmarking.md lists them).

A method's *parameters* are never touched here: it runs with its registry defaults overridden by the
config's `params`, nothing else. What a method needs besides q, k, v and its parameters is made here,
once per case, seeded, before anything is timed:

- `gla`: `g`, the paper's forget gate logsigmoid(x) / 16 of standard normal x (B, H, N, D). The
  `fla_gla` baseline gets the same gate.
- `lawcat`: `g`, the constant forget gate logsigmoid(3) (a = 0.95 per token) of LAWCAT's initialised
  adapter (B, H, N); its causal convolutions start as the identity, so none is passed.
- `flashbias`: `bias_factors` (U, W), random rank-8 factors U (B, Hq, N, 8) and W (B, 1, M, 8) with
  entries of variance 1/sqrt(8): an additive bias U W^T of standard deviation about 1.
- `block_sparse`: `block_mask`, a random half of the admissible blocks of every query-block row
  (`attnzoo.masks.random`, density 0.5) at the method's own `block_size`.

Other methods get nothing: `seerattention` without a gate ranks blocks by the oracle (the true block
attention map, the target a trained gate learns), `sparsed` runs without a step schedule.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

from attnzoo import masks

GLA_GATE_NORMALIZER = 16.0  # GLA's temperature: gates near 0, slow forgetting
LAWCAT_GATE_BIAS = 3.0  # LAWCATAdapter's initial gate logit (w = 0, b = 3)
BIAS_RANK = 8
BLOCK_SPARSE_DENSITY = 0.5


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def gla_gate(shape, *, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    """GLA's log forget gate logsigmoid(x) / 16 of standard normal x, of `shape`."""
    x = torch.randn(shape, generator=_generator(device, seed), device=device)
    return (F.logsigmoid(x) / GLA_GATE_NORMALIZER).to(dtype)


def _gla(q, k, v, *, causal, params, seed) -> dict[str, Any]:
    return {"g": gla_gate(q.shape, dtype=q.dtype, device=q.device, seed=seed)}


def _lawcat(q, k, v, *, causal, params, seed) -> dict[str, Any]:
    return {"g": torch.full(q.shape[:3], F.logsigmoid(torch.tensor(LAWCAT_GATE_BIAS)).item(),
                            dtype=q.dtype, device=q.device)}


def _flashbias(q, k, v, *, causal, params, seed) -> dict[str, Any]:
    generator = _generator(q.device, seed)
    (batch, heads, n, _), m = q.shape, k.shape[2]
    u, w = (torch.randn(shape, generator=generator, device=q.device) / math.sqrt(math.sqrt(BIAS_RANK))
            for shape in ((batch, heads, n, BIAS_RANK), (batch, 1, m, BIAS_RANK)))
    return {"bias_factors": (u.to(q.dtype), w.to(q.dtype))}


def _block_sparse(q, k, v, *, causal, params, seed) -> dict[str, Any]:
    mask = masks.random(q.shape[2], k.shape[2], BLOCK_SPARSE_DENSITY, params["block_size"], batch=q.shape[0],
                        heads=q.shape[1], seed=seed, causal=causal, device=q.device)
    return {"block_mask": mask}


BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "gla": _gla,
    "lawcat": _lawcat,
    "flashbias": _flashbias,
    "block_sparse": _block_sparse,
}


def build(method: str, q, k, v, *, causal: bool, params: dict[str, Any], seed: int) -> dict[str, Any]:
    """The extra inputs `method` is called with on these q, k, v (empty for most methods). `params` are
    the parameters the method will run with (block_sparse cuts its mask into its own block_size)."""
    builder = BUILDERS.get(method)
    return {} if builder is None else builder(q, k, v, causal=causal, params=params, seed=seed)
