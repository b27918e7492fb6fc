"""One module per method. Each reads like its paper's algorithm box: choose blocks or features,
then call a shared kernel. A module may also define

    example_kwargs(q, k, v, *, causal) -> dict   # extra inputs `attnzoo check` passes it
    reference(q, k, v, *, causal, scale, **params) -> Tensor   # slow float64 version, if not dense
"""
