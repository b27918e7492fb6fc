"""One module per method. Each reads like its paper's algorithm box: choose blocks or features,
then call a shared kernel. A module may also define

    example_kwargs(q, k, v, *, causal) -> dict   # extra inputs `attnzoo check` passes it

A method's slow float64 version lives in attnzoo/reference/ (`attnzoo.reference.exact_output`),
written from its definition with the reference's own primitives; methods never import it.
"""
