"""The two error columns of a row, both relative Frobenius errors in float64.

- `err_vs_exact`: against the method's *own* exact definition (`attnzoo.reference.exact_output`) on
  the same q, k, v, with the parameters it received and the extra inputs it was given (flashbias with
  its bias, gla with its gate, linear methods against their recurrence / quadratic form, sparse
  methods restricted to the blocks they chose). It measures the implementation, not the method's
  idea: ~1e-7 in float32 for every correct kernel.
- `err_vs_dense`: against float64 softmax attention (`attnzoo.reference.attention`), only for
  contenders that approximate softmax attention of q, k, v: sparse methods and exact methods given
  no extra input (dense, the SDPA/flash-attn baselines). Empty for flashbias (its bias changes the
  output by design) and for linear methods (another function altogether). For dense it is its
  rounding error, the floor every sparse method's error sits on.

The float64 references are computed on the CPU. A case whose score matrix B * H * N * M exceeds
`MAX_SCORES` gets no errors (empty cells, and a note in bench.json).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from attnzoo import reference

MAX_SCORES = 2**28  # 2 GiB of float64 scores per reference


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius, in float64, on ref's device)."""
    out = out.detach().to(device=ref.device, dtype=torch.float64)
    ref = ref.to(torch.float64)
    return (torch.linalg.vector_norm(out - ref) / torch.linalg.vector_norm(ref)).item()


def approximates_softmax(family: str, inputs: dict[str, Any]) -> bool:
    """Whether err_vs_dense means something: sparse methods, and exact ones that get only q, k, v."""
    return family == "sparse" or (family == "exact" and not inputs)


def exact_name(name: str, family: str) -> str | None:
    """The oracle that defines `name`: its own, else (a third-party method) masked dense attention for a
    sparse method given its blocks and dense attention for an exact one; None for an unknown linear one."""
    if name in reference.known_methods():
        return name
    return {"sparse": "block_sparse", "exact": "dense"}.get(family)


class References:
    """The float64 references of one case, computed on first use."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool):
        self.causal = causal
        self.q, self.k, self.v = (t.detach().to(device="cpu", dtype=torch.float64) for t in (q, k, v))
        batch, heads, n, _ = q.shape
        self.scores = batch * heads * n * k.shape[2]

    @property
    def measurable(self) -> bool:
        return self.scores <= MAX_SCORES

    @property
    def too_large(self) -> str:
        return (f"no errors: the float64 reference would hold B*H*N*M = {self.scores} scores, "
                f"above {MAX_SCORES}")

    @functools.cached_property
    def dense(self) -> torch.Tensor:
        return reference.attention(self.q, self.k, self.v, causal=self.causal)

    def exact(self, name: str, *, params: dict[str, Any], inputs: dict[str, Any], block_mask=None) -> torch.Tensor:
        """`name`'s exact output on these inputs; `block_mask`: the attnzoo.BlockMask the method chose."""
        blocks = None if block_mask is None else (block_mask.to_dense(), block_mask.block_size)
        scale = self.q.shape[-1] ** -0.5
        return reference.exact_output(name, self.q, self.k, self.v, causal=self.causal, scale=scale,
                                      params=params, inputs=inputs, block_mask=blocks)
