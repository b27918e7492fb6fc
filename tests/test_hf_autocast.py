"""Inside torch.autocast, attnzoo's output follows the autocast dtype as SDPA's does (api.Method.__call__),
for direct calls and for patched models."""

import pytest
import torch
import torch.nn.functional as F

import attnzoo

pytestmark = pytest.mark.usefixtures("one_thread")
BF16 = torch.bfloat16


def qkv(n=40, d=32):
    torch.manual_seed(0)
    return torch.randn(2, 4, n, d), torch.randn(2, 2, n, d), torch.randn(2, 2, n, d)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_dense_follows_autocast_like_sdpa(backend):
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=BF16):
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        got = attnzoo.attention(q, k, v, causal=True, backend=backend)
    assert want.dtype == got.dtype == BF16
    exact = attnzoo.attention(q.to(BF16), k.to(BF16), v.to(BF16), causal=True, backend=backend)
    assert torch.equal(got, exact)  # the same call as on bf16 inputs outside autocast
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("method,params", [("xattention", {"block_size": 16, "stride": 4}), ("gla", {})])
def test_every_family_follows_autocast_alike_on_both_backends(method, params):
    """Both backends take the autocast dtype as their input dtype (issue 16: the Triton path stayed fp32)."""
    q, k, v = qkv(32, 16)
    k, v = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    fn = attnzoo.get(method, **params)
    outputs = {}
    for backend in ("torch", "triton"):
        with torch.autocast("cpu", dtype=BF16):
            outputs[backend] = fn(q, k, v, causal=True, backend=backend)
        assert outputs[backend].dtype == BF16
        in_bf16 = fn(q.to(BF16), k.to(BF16), v.to(BF16), causal=True, backend=backend)
        assert torch.equal(outputs[backend], in_bf16)  # the precision of the call on bf16 inputs
    torch.testing.assert_close(outputs["triton"].float(), outputs["torch"].float(), atol=2e-2, rtol=2e-2)


def test_outside_autocast_and_disabled_autocast_keep_the_input_dtype():
    q, k, v = qkv()
    assert attnzoo.attention(q, k, v, backend="torch").dtype == torch.float32
    with torch.autocast("cpu", dtype=BF16, enabled=False):
        assert attnzoo.attention(q, k, v, backend="torch").dtype == torch.float32


def test_patched_model_under_autocast_matches_sdpa_under_autocast():
    transformers = pytest.importorskip("transformers")
    from attnzoo import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.randint(1, 97, (2, 16))
    with torch.autocast("cpu", dtype=BF16), torch.no_grad():
        want = model(input_ids=ids).logits
        with hf.patched(model, "dense", backend="torch"):
            got = model(input_ids=ids).logits
    assert got.dtype == want.dtype
    torch.testing.assert_close(got, want, atol=3e-2 * want.abs().max().item(), rtol=0)
