"""Context parallelism: one sequence sharded across the ranks of a torch.distributed process group.

    import attnzoo.distributed as cp
    q_local, k_local, v_local = (cp.shard_sequence(x, group, zigzag=True) for x in (q, k, v))
    out_local = cp.context_parallel("xattention", group, zigzag=True, threshold=0.9)(q_local, k_local, v_local,
                                                                                      causal=True)
    out = cp.gather_sequence(out_local, group, zigzag=True)   # == attnzoo.get("xattention", ...)(q, k, v, ...)

Exact and block-sparse methods (dense, block_sparse, xattention, seerattention, s2, sparsed,
flashbias) run ring attention with logsumexp merging over a block mask chosen for the whole
sequence (ring.py, flash_family.py); linear methods (gla, based, lawcat, wersa) pass chunk states in
sequence order (linear_family.py). See docs/distributed.md.
"""

from .api import CONTEXT_PARALLEL_METHODS, ContextParallel, context_parallel
from .layout import gather_sequence, shard_sequence

__all__ = ["CONTEXT_PARALLEL_METHODS", "ContextParallel", "context_parallel", "gather_sequence", "shard_sequence"]
