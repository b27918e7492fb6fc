"""One module per method. Each reads like its paper's algorithm box: choose blocks or features,
then call a shared kernel. A module may also define

    example_kwargs(q, k, v, *, causal) -> dict   # extra inputs `attnzoo check` passes it

A method's slow float64 version lives in attnzoo/reference/ (`attnzoo.reference.exact_output`),
written from its definition with the reference's own primitives; methods never import it.
"""

import torch


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32 (float64 stays): the linear methods form their feature maps in fp32 at least, since
    features of half-precision inputs overflow (BASED's squares) or feed the fp32 state rounded."""
    return x.to(torch.promote_types(x.dtype, torch.float32))
