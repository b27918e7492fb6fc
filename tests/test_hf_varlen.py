"""Padding-free batches in patched HF models (issue 14, item 4): sequences packed end to end in one row,
marked by position_ids restarting at 0 (transformers' DataCollatorWithFlattening; transformers then masks
them block-diagonally when there is no cache) or by its flash keywords (cu_seq_lens_q/k, max_length_q/k),
run through the method's packed call; the logits equal the unpatched model's on the same pack and on each
sequence alone. With a cache transformers treats such a row as one sequence, and so does patching. A pack
whose mask says more than its sequences is refused."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("attnzoo.hf")

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
LENGTHS = [5, 11, 1, 8]


def llama(implementation: str):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      attn_implementation=implementation)
    return transformers.LlamaForCausalLM(config).eval()


def sequences():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, VOCAB, (1, n), generator=gen) for n in LENGTHS]


def packed(seqs):
    """input_ids (1, total) and position_ids counting each sequence from 0, as DataCollatorWithFlattening."""
    ids = torch.cat(seqs, dim=1)
    positions = torch.cat([torch.arange(s.shape[1]) for s in seqs])[None]
    return ids, positions


def alone(model, seqs):
    with torch.no_grad():
        return torch.cat([model(input_ids=s, use_cache=False).logits for s in seqs], dim=1)


def logits(model, ids, positions, **kw):
    with torch.no_grad():
        return model(input_ids=ids, position_ids=positions, **kw).logits


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("method, backend", [("dense", "torch"), ("dense", "triton"), ("gla", "torch")])
def test_a_pack_marked_by_position_ids_equals_each_sequence_alone(implementation, method, backend):
    model = llama(implementation)
    seqs = sequences()
    ids, positions = packed(seqs)
    unpatched = logits(model, ids, positions, use_cache=False)
    with hf.patched(model, method, backend=backend):
        want = alone(model, seqs)  # the patched model on each sequence alone (gla has no unpatched twin)
        got = logits(model, ids, positions, use_cache=False)
    if method == "dense":
        torch.testing.assert_close(unpatched, alone(model, seqs), rtol=0, atol=1e-5 * want.abs().max().item())
        torch.testing.assert_close(got, unpatched, rtol=0, atol=1e-5 * want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_with_a_cache_the_row_is_one_sequence_as_unpatched():
    model = llama("sdpa")
    ids, positions = packed(sequences())
    want = logits(model, ids, positions)  # use_cache: transformers masks the row causally, as one sequence
    with hf.patched(model, "dense", backend="torch"):
        got = logits(model, ids, positions)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_a_pack_marked_by_flash_keywords_equals_each_sequence_alone():
    model = llama("sdpa")
    seqs = sequences()
    ids, positions = packed(seqs)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    want = alone(model, seqs)
    with hf.patched(model, "dense", backend="torch"):
        got = logits(model, ids, positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                     max_length_q=max(LENGTHS), max_length_k=max(LENGTHS))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_gradients_of_a_pack_equal_those_of_its_sequences():
    model = llama("sdpa").train()
    seqs = sequences()
    ids, positions = packed(seqs)
    with hf.patched(model, "dense", backend="torch"):
        model(input_ids=ids, position_ids=positions, use_cache=False).logits.square().sum().backward()
        packed_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        sum(model(input_ids=s, use_cache=False).logits.square().sum() for s in seqs).backward()
    for got, p in zip(packed_grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-5)


def test_a_mask_with_more_than_the_pack_is_refused():
    """Flash keywords that pack the row, and an attention_mask that also pads a token: the packed call
    would ignore the padding."""
    model = llama("sdpa")
    ids, positions = packed(sequences())
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    mask = torch.ones_like(ids)
    mask[0, 2] = 0
    with hf.patched(model, "dense", backend="torch"), pytest.raises(NotImplementedError, match="packed batch"):
        logits(model, ids, positions, attention_mask=mask, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
