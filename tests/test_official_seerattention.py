"""seerattention's gate, its loss and the loading of official weights, against the official code
restated here in float64.

The oracle follows microsoft/SeerAttention (snapshot aba03e3): `AttnGate` and `MultiHeadLinear` in
`seer_attn/prefill_sparse/attn_gate.py` (pooling with max_pool3d / -max_pool3d(-x) / avg_pool3d over
blocks of the (B, S, H, D) layout with ceil_mode, no q projection when Q uses one pool and
hidden == head_dim unless force_double, the k projection then per query head on k repeated over its
group), `apply_rotary_pos_emb` in `seer_attn/modules/common.py` (rotate-half on the first R dims),
the block rotary embedding of `seer_attn/prefill_sparse/llama/modeling_llama_seerattn.py` (the
model's LlamaRotaryEmbedding on a copy of its config with hidden_size = gate hidden x heads, at the
positions position_ids[:, 0::block]), its block-causal mask filled with -1e9, and its loss
`torch.nn.KLDivLoss()` of the gate's log_softmax against the target.
"""

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.methods.seerattention import AttnGate, gate_loss, load_official_gates, official_gate

transformers = pytest.importorskip("transformers")
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding  # noqa: E402

POOL = {"max": F.max_pool3d, "min": lambda x, **kw: -F.max_pool3d(-x, **kw), "avg": F.avg_pool3d}
GATE_TYPES = [f"Q{''.join(q)}_K{''.join(k)}"
              for nq in (1, 2, 3) for nk in (1, 2, 3)
              for q in itertools.combinations(("max", "min", "avg"), nq)
              for k in itertools.combinations(("max", "min", "avg"), nk)]


def official_layout(q_pools, hidden, head_dim, force_double):
    """True where the official AttnGate builds a q projection (mask_linear_q)."""
    return len(q_pools) > 1 or hidden != head_dim or force_double


def official_weights(gate_type, *, head_dim, hidden, q_heads, kv_heads, force_double, seed):
    """A state dict in the official layout: MultiHeadLinear weights (heads, in, hidden)."""
    q_pools, k_pools = (part[1:].replace("max", "max ").replace("min", "min ").replace("avg", "avg ").split()
                        for part in gate_type.split("_"))
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    if official_layout(q_pools, hidden, head_dim, force_double):
        weights["mask_linear_q.weight"] = torch.randn(q_heads, len(q_pools) * head_dim, hidden, generator=gen) * 0.3
        k_heads = kv_heads
    else:
        k_heads = q_heads  # the official k projection has num_q_head heads in this layout
    weights["mask_linear_k.weight"] = torch.randn(k_heads, len(k_pools) * head_dim, hidden, generator=gen) * 0.3
    return q_pools, k_pools, weights


def rotate_half(x):
    x1, x2 = x[..., :x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def official_gate_probs(q, k, weights, *, q_pools, k_pools, block, hidden, rotary):
    """The official AttnGate.forward (use_softmax=True) with a block-causal bool mask, in float64.
    q (B, S, Hq, D), k (B, S, Hk, D) pre-RoPE, S = N = M (prefill) -> (B, Hq, nB, nB)."""
    B, S, Hq, D = q.shape
    Hk = k.shape[2]
    pool = dict(kernel_size=[block, 1, 1], stride=[block, 1, 1], ceil_mode=True)
    gq = torch.cat([POOL[name](q, **pool) for name in q_pools], dim=-1)  # (B, nB, Hq, |q| D)
    if "mask_linear_q.weight" in weights:
        gq = torch.einsum("bshi,hio->bsho", gq, weights["mask_linear_q.weight"].double())
    gk = torch.cat([POOL[name](k, **pool) for name in k_pools], dim=-1)  # (B, nB, Hk, |k| D)
    wk = weights["mask_linear_k.weight"].double()
    if gk.shape[2] < wk.shape[0]:  # MultiHeadLinear repeats kv heads up to its head count
        gk = gk.repeat_interleave(wk.shape[0] // gk.shape[2], dim=2)
    gk = torch.einsum("bshi,hio->bsho", gk, wk)
    positions = torch.arange(S)[None, 0::block]
    cos, sin = (t.double().unsqueeze(2) for t in rotary(gq.double(), positions))  # (1, nB, 1, R)
    r = cos.shape[-1]
    gq = torch.cat([gq[..., :r] * cos + rotate_half(gq[..., :r]) * sin, gq[..., r:]], dim=-1)
    gk = torch.cat([gk[..., :r] * cos + rotate_half(gk[..., :r]) * sin, gk[..., r:]], dim=-1)
    gq, gk = gq.transpose(1, 2), gk.transpose(1, 2)
    if gk.shape[1] < Hq:
        gk = gk.repeat_interleave(Hq // gk.shape[1], dim=1)
    attn = gq @ gk.transpose(-1, -2) * hidden ** -0.5
    n_blocks = attn.shape[-1]
    causal = torch.ones(n_blocks, n_blocks, dtype=torch.bool).tril()
    return torch.softmax(attn.masked_fill(~causal, -1e9), dim=-1)


def block_rotary(*, q_heads, kv_heads, head_dim, hidden, rope_parameters):
    """modeling_llama_seerattn.py's block_rotary_emb for a Llama config with these heads and RoPE."""
    config = transformers.LlamaConfig(hidden_size=q_heads * head_dim, num_attention_heads=q_heads,
                                      num_key_value_heads=kv_heads, rope_parameters=rope_parameters,
                                      max_position_embeddings=131072)
    block_config = copy.deepcopy(config)
    block_config.hidden_size = hidden * q_heads
    return LlamaRotaryEmbedding(config=block_config)


ROPES = [{"rope_type": "default", "rope_theta": 10000.0},
         {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
         {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768}]


@given(gate_type=st.sampled_from(GATE_TYPES), heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]),
       head_dim=st.sampled_from([16, 32]), wide=st.booleans(), force_double=st.booleans(),
       rope=st.sampled_from(ROPES), n=st.integers(32, 100), block=st.sampled_from([16, 32]),
       seed=st.integers(0, 2**31 - 1))
@settings()
def test_gate_layouts_equal_the_official_gate(gate_type, heads, head_dim, wide, force_double, rope, n, block, seed):
    """Every official pooling combination and both layouts (with and without a q projection), the
    official weights loaded by load_official_gates, RoPE from the model's rotary config; with a
    hidden size twice the head dim the block rotary covers the first head_dim dims (the config states
    head_dim), as the official apply_rotary_pos_emb does. Ragged lengths of at least one block (the
    official pooling raises on a sequence shorter than its kernel)."""
    q_heads, kv_heads = heads
    hidden = 2 * head_dim if wide else head_dim
    q_pools, k_pools, weights = official_weights(gate_type, head_dim=head_dim, hidden=hidden, q_heads=q_heads,
                                                 kv_heads=kv_heads, force_double=force_double, seed=seed)
    rotary = block_rotary(q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, hidden=hidden, rope_parameters=rope)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(1, q_heads, n, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(1, kv_heads, n, head_dim, generator=gen, dtype=torch.float64)
    gate = official_gate(gate_type, head_dim, q_heads, kv_heads, hidden=hidden, block_size=block,
                         force_double=force_double, rope=rotary).double()
    load_official_gates(gate, {f"model.layers.0.self_attn.attn_gate.{name}": w for name, w in weights.items()})
    want = official_gate_probs(q.transpose(1, 2), k.transpose(1, 2), weights, q_pools=q_pools, k_pools=k_pools,
                               block=block, hidden=hidden, rotary=rotary)
    torch.testing.assert_close(gate(q, k, causal=True), want, rtol=1e-10, atol=1e-12)


@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), cols=st.integers(1, 6))
@settings()
def test_gate_loss_default_is_the_official_kldivloss(seed, rows, cols):
    """gate_loss(logits, target) == torch.nn.KLDivLoss()(log_softmax(logits), target): the mean over
    every element, so its gradients are those of the official loss (not nKB times larger)."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(2, 3, rows, cols, generator=gen, dtype=torch.float64), -1)
    logits = torch.randn(2, 3, rows, cols, generator=gen, dtype=torch.float64, requires_grad=True)
    ours = gate_loss(logits, target)
    (grad_ours,) = torch.autograd.grad(ours, logits)
    official = torch.nn.KLDivLoss()(F.log_softmax(logits, dim=-1), target)
    (grad_official,) = torch.autograd.grad(official, logits)
    torch.testing.assert_close(ours, official)
    torch.testing.assert_close(grad_ours, grad_official)


def _tiny_llama(layers=2):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      rope_parameters=ROPES[1], max_position_embeddings=4096)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval(), config


def test_patched_model_gates_load_the_official_state_dict_and_rotate_as_the_model():
    """A patched model's gates take the per-layer weights of an official attn_gate_weights.pth-style
    state dict (keys model.layers.<i>.self_attn.attn_gate.mask_linear_{q,k}.weight), and their RoPE is
    the model's rotary embedding (its llama3 rope scaling)."""
    model, config = _tiny_llama()
    attnzoo.patch(model, "seerattention", topk_ratio=0.5, block_size=16, backend="torch")
    gates = [m.attnzoo.adapter for _, m in attnzoo.hf.attention_layers(model)]
    gen = torch.Generator().manual_seed(0)
    state = {}
    for i, gate in enumerate(gates):
        for name, attr in (("mask_linear_q.weight", "q_proj"), ("mask_linear_k.weight", "k_proj")):
            shape = getattr(gate, attr).shape
            state[f"model.layers.{i}.self_attn.attn_gate.{name}"] = torch.randn(shape, generator=gen)
    load_official_gates(model, state)
    for i, gate in enumerate(gates):
        assert torch.equal(gate.q_proj.detach(), state[f"model.layers.{i}.self_attn.attn_gate.mask_linear_q.weight"])
        assert torch.equal(gate.k_proj.detach(), state[f"model.layers.{i}.self_attn.attn_gate.mask_linear_k.weight"])
    x = torch.zeros(1, gates[0].hidden)
    positions = torch.arange(0, 64, 16)[None]
    want = LlamaRotaryEmbedding(config=config)(x, positions)
    for got, expected in zip(gates[0].rope(x, positions), want):
        torch.testing.assert_close(got, expected)
    assert torch.isfinite(model(torch.randint(0, 97, (1, 40))).logits).all()


def test_a_gate_without_q_projection_has_per_query_head_k_projection():
    """The official layout for one Q pool and hidden == head_dim (the released Qavg_Kmaxminavg gates
    on D = 128): no q projection, k projection (Hq, 3 D, hidden)."""
    gate = AttnGate(128, 32, 8)
    assert gate.q_proj is None and tuple(gate.k_proj.shape) == (32, 384, 128)
    assert tuple(AttnGate(128, 32, 8, q_proj=True).k_proj.shape) == (8, 384, 128)
    assert tuple(AttnGate(64, 32, 8).q_proj.shape) == (32, 64, 128)  # hidden != head_dim: projected


@pytest.mark.parametrize("make, state, match", [
    (lambda: AttnGate(16, 2, 1, hidden=16), {"mask_linear_q.weight": torch.zeros(2, 16, 16),
                                              "mask_linear_k.weight": torch.zeros(2, 48, 16)}, "has no q_proj"),
    (lambda: AttnGate(16, 2, 1, hidden=16), {"mask_linear_k.weight": torch.zeros(1, 48, 16)}, "shape"),
    (lambda: AttnGate(16, 2, 1, hidden=16), {"o_proj.weight": torch.zeros(1)}, "not an official gate weight"),
    (lambda: AttnGate(16, 2, 1, hidden=16), {"layers.0.mask_linear_k.weight": torch.zeros(2, 48, 16),
                                              "layers.1.mask_linear_k.weight": torch.zeros(2, 48, 16)}, "one gate"),
    (lambda: torch.nn.ModuleDict({"layers": torch.nn.ModuleList([AttnGate(16, 2, 1, hidden=16)])}),
     {"model.layers.3.self_attn.attn_gate.mask_linear_k.weight": torch.zeros(2, 48, 16)}, "do not pair up"),
])
def test_load_official_gates_refuses_what_does_not_fit(make, state, match):
    with pytest.raises(ValueError, match=match):
        load_official_gates(make(), state)


@pytest.mark.parametrize("kwargs, match", [
    ({"q_pooling": ("avg", "avg")}, "q_pooling"),
    ({"k_pooling": ("median",)}, "k_pooling"),
    ({"q_proj": False, "hidden": 32}, "q_proj=False"),
    ({"q_proj": "yes"}, "q_proj must be"),
    ({"rope": 3}, "rope must be"),
])
def test_bad_gate_layouts_are_rejected(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        AttnGate(16, 2, 1, **{"hidden": 16, **kwargs})


def test_bad_gate_type_is_rejected():
    with pytest.raises(ValueError, match="gate_type"):
        official_gate("Qmean_Kmax", 16, 2, 1)
