"""Independent oracles: one slow, obviously-correct version of every method, for tests and
`attnzoo check`.

Each module is written from the method's definition in shared/METHODS.md with its own primitives
(explicit loops and einsums, float64 in tests) and imports nothing of attnzoo outside this package;
the methods never import it (DESIGN.md sections 5 and 8).

    dense.py          softmax attention with masks, windows, softcap, bias (dense, block_sparse, sparse)
    blocks.py         block facts read off the element mask (admissible, fully visible, diagonal blocks)
    xattention.py     antidiagonal estimate + threshold selection
    seerattention.py  block target, selection rules, AttnGate
    s2.py             the local + vertical-stride pattern
    sparsed.py        block-mean importance, per-region top-k, schedule
    flashbias.py      explicit biases (factors, ALiBi, relative position)
    linear.py         linear attention: recurrence and quadratic form
    gla.py, based.py, lawcat.py, wersa.py   the linear methods

`exact_output(name, q, k, v, ...)` gives any registered method's exact float64 output.
"""

from __future__ import annotations

import torch

from . import based as _based
from . import flashbias as _flashbias
from . import gla as _gla
from . import lawcat as _lawcat
from . import s2 as _s2
from . import seerattention as _seer
from . import sparsed as _sparsed
from . import wersa as _wersa
from . import xattention as _xattention
from .based import taylor_features
from .dense import attention, expand_block_mask, visible_mask
from .lawcat import causal_depthwise_conv
from .linear import recurrent_linear_attention
from .wersa import haar_dwt, haar_idwt

__all__ = ["attention", "causal_depthwise_conv", "exact_output", "expand_block_mask", "haar_dwt", "haar_idwt",
           "known_methods", "recurrent_linear_attention", "taylor_features", "visible_mask"]

_SPARSE = ("block_sparse", "xattention", "s2", "sparsed", "seerattention")
_KNOWN = ("dense", "flashbias", "gla", "based", "lawcat", "wersa") + _SPARSE


def known_methods() -> list[str]:
    """The methods `exact_output` has an oracle for."""
    return sorted(_KNOWN)


def _f64(x):
    """Float tensors to float64 on the CPU (bool/int tensors to the CPU), recursively in tuples."""
    if isinstance(x, torch.Tensor):
        return x.to(device="cpu", dtype=torch.float64) if x.is_floating_point() else x.cpu()
    if isinstance(x, (tuple, list)):
        return type(x)(_f64(t) for t in x)
    return x


def _pair(block_size) -> tuple[int, int]:
    if isinstance(block_size, (tuple, list)):
        return int(block_size[0]), int(block_size[1])
    return int(block_size), int(block_size)


def _as_blocks(block_mask, default_block_size):
    """(bool tensor (B|1, H|1, nQB, nKB), (block_q, block_k)) from a pair, or from any object with
    `to_dense()` and `block_size` (an attnzoo.BlockMask), or a bool tensor cut by default_block_size."""
    if isinstance(block_mask, (tuple, list)):
        blocks, size = block_mask
        return blocks, _pair(size)
    if isinstance(block_mask, torch.Tensor):
        return block_mask, _pair(default_block_size)
    return block_mask.to_dense(), _pair(block_mask.block_size)


def _chosen_blocks(name, q, k, causal, scale, opts):
    """The blocks the method's definition chooses, when the caller did not pass the ones it chose."""
    n, m = q.shape[2], k.shape[2]
    block_q, block_k = _pair(opts.get("block_size", 128))
    if name == "block_sparse":
        if opts.get("block_mask") is None:
            raise ValueError("block_sparse: pass block_mask (in inputs or as block_mask=)")
        blocks, size = _as_blocks(opts["block_mask"], opts.get("block_size", 128))
        return blocks.cpu(), size
    if name == "s2":
        pattern = _s2.s2_pattern(n, m, q.shape[1], k.shape[1], block_size=block_q, causal=causal,
                                 local_blocks=opts.get("local_blocks", 16), vert_stride=opts.get("vert_stride", 8),
                                 homo_head=bool(opts.get("homo_head", False)),
                                 num_dense_heads=opts.get("num_dense_heads", 0),
                                 head_sliding_offset=opts.get("head_sliding_offset", 0),
                                 head_sliding_step=opts.get("head_sliding_step"))
        return pattern, (block_q, block_q)
    if name == "xattention":
        if opts.get("selection", "attnzoo") != "attnzoo":
            raise ValueError("xattention with selection='official': pass the block_mask the method returned "
                             "(the official rule's oracle is tests/test_official_xattention.py)")
        blocks = _xattention.select_blocks(q, k, stride=opts.get("stride", 8), threshold=opts.get("threshold", 0.9),
                                           block_q=block_q, block_k=block_k, scale=scale, causal=causal)
        return blocks, (block_q, block_k)
    if name == "sparsed":
        if opts.get("step") is not None:
            raise ValueError("sparsed with a schedule (step=): pass the block_mask the step used")
        blocks = _sparsed.select_blocks(q, k, select=opts.get("select", 0.3), block_q=block_q, block_k=block_k,
                                        gen_len=opts.get("gen_len"), scale=scale)
        return blocks, (block_q, block_k)
    # seerattention
    block = int(opts.get("block_size", 64))
    gate = opts.get("gate")
    if gate is None:
        scores = _seer.block_target(q, k, block, causal=causal, scale=scale)
    elif isinstance(gate, torch.Tensor):
        scores = gate
    else:
        raise ValueError("seerattention with a gate module: pass the block_mask the method returned")
    blocks = _seer.select_blocks(scores, n, m, block_size=block, causal=causal, threshold=opts.get("threshold"),
                                 topk_ratio=opts.get("topk_ratio"), last_blocks_dense=opts.get("last_blocks_dense", 2))
    return blocks, (block, block)


def exact_output(name: str, q, k, v, *, causal: bool, scale: float, params: dict, inputs: dict,
                 block_mask=None) -> torch.Tensor:
    """The exact float64 output (B, Hq, N, Dv) of method `name` on q (B, Hq, N, D), k (B, Hk, M, D),
    v (B, Hk, M, Dv), given the parameters it received (`params`, registry defaults included) and its
    extra inputs (`inputs`: g, bias, bias_factors, alibi_slopes, gains, conv_q, conv_k, initial_state,
    gate, block_mask, ...).

    - dense: softmax attention with window_size, softcap, an additive `bias` and `sinks`;
    - block_sparse, xattention, s2, sparsed, seerattention: softmax attention restricted to
      `block_mask` = (bool tensor (B|1, H|1, nQB, nKB), (block_q, block_k)), the blocks the method chose
      (an attnzoo.BlockMask is accepted too), within window_size and with softcap. Without it, the blocks the oracle's own definition
      chooses (at near ties of the estimates the method may choose differently: pass its blocks);
    - flashbias: softmax attention plus the explicit bias of bias_factors (U W^T), alibi_slopes, or a
      full `bias`. For a full `bias` the exact output is that of the full bias, whatever `rank` the
      method factored it to (with a truncated rank the method approximates this);
    - gla: the gated recurrence (the output only, also under output_final_state);
    - based, lawcat, wersa: their quadratic / recurrent definitions.
    Computed on the CPU in float64 and returned there; gradients flow back to the float inputs (they
    are converted with .to(), not detached).
    Raises KeyError naming the known methods for an unknown name.
    """
    if name not in _KNOWN:
        raise KeyError(f"no oracle for method {name!r}; known methods: {', '.join(known_methods())}")
    opts = {**params, **inputs}
    q, k, v = _f64(q), _f64(k), _f64(v)
    if name == "dense":
        window = tuple(opts.get("window_size") or (-1, -1))
        softcap = float(opts.get("softcap", 0.0))
        return attention(q, k, v, causal=causal, scale=scale, window_size=window, softcap=softcap,
                         bias=_f64(opts.get("bias")), sinks=_f64(opts.get("sinks")))
    if name in _SPARSE:
        if block_mask is not None:
            blocks, (block_q, block_k) = _as_blocks(block_mask, opts.get("block_size", 128))
            blocks = blocks.cpu()
        else:
            blocks, (block_q, block_k) = _chosen_blocks(name, q, k, causal, scale, opts)
        mask = expand_block_mask(blocks.to(torch.bool), q.shape[2], k.shape[2], block_q, block_k)
        window = tuple(opts.get("window_size") or (-1, -1))
        return attention(q, k, v, causal=causal, scale=scale, mask=mask, window_size=window,
                         softcap=float(opts.get("softcap", 0.0)))
    if name == "flashbias":
        return _flashbias.flashbias(q, k, v, causal=causal, scale=scale, bias_factors=_f64(opts.get("bias_factors")),
                                    bias=_f64(opts.get("bias")), alibi_slopes=_f64(opts.get("alibi_slopes")))
    if name == "gla":
        return _gla.gla(q, k, v, scale=scale, g=_f64(opts.get("g")), initial_state=_f64(opts.get("initial_state")))[0]
    if name == "based":
        return _based.based(q, k, v, causal=causal, scale=scale, use_norm=opts.get("use_norm", True),
                            eps=opts.get("eps", 1e-6))
    if name == "lawcat":
        return _lawcat.lawcat(q, k, v, g=_f64(opts.get("g")), conv_q=_f64(opts.get("conv_q")),
                              conv_k=_f64(opts.get("conv_k")), feature_map=opts.get("feature_map", "elu1"),
                              eps=opts.get("eps", 1e-6))
    return _wersa.wersa(q, k, v, levels=opts.get("levels", 2), num_features=opts.get("num_features", 256),
                        gains=_f64(opts.get("gains")), seed=opts.get("seed", 0))
