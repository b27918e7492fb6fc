"""seerattention: block selection from a gate (or the oracle map), the block-sparse kernel, the
distillation target and loss, and the AttnGate module (METHODS.md, seerattention). Outputs are
compared with the float64 reference restricted to the returned blocks; kernels run under the Triton
interpreter (CPU)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo.methods.seerattention import AttnGate, block_attention_target, gate_loss, select_blocks
from attnzoo.reference import attention, expand_block_mask, visible_mask
from attnzoo.reference import seerattention as oracle
from attnzoo.reference.blocks import admissible_blocks as _admissible
from pictures import draw, picture

BACKENDS = st.sampled_from(["triton", "torch"])
SEEDS = st.integers(0, 2**31 - 1)


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("ATTNZOO_POISON", "1")


@st.composite
def shapes(draw, max_len=48):
    """(B, Hq, Hk, N, M, D, Dv) with at most 4 (batch, query head) pairs: the interpreter is slow."""
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.integers(1, 4 // (batch * kv_heads)))
    return (batch, kv_heads * group, kv_heads, draw(st.integers(1, max_len)), draw(st.integers(1, max_len)),
            draw(st.sampled_from([16, 32])), draw(st.sampled_from([16, 24])))


def make_qkv(shape, seed):
    B, Hq, Hk, N, M, D, Dv = shape
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, Hq, N, D, generator=gen), torch.randn(B, Hk, M, D, generator=gen), \
        torch.randn(B, Hk, M, Dv, generator=gen)


def doubles(*tensors):
    return [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def assert_close(actual, expected, rtol=1e-5):
    """fp32 result vs float64 reference: relative to the largest magnitude of the expected tensor."""
    expected = expected.to(actual.dtype)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(expected.abs().max().item(), 1.0))


def admissible_blocks(n, m, block, causal):
    """(nQB, nKB) bool read off the element mask: blocks holding at least one visible key."""
    return _admissible(n, m, block, block, causal=causal)


def reference_block_target(q, k, block, causal):
    """The max over each tile of the float64 softmax map, row-normalised (attnzoo.reference)."""
    return oracle.block_target(q, k, block, causal=causal)


def make_gate(kind, q, k, block, seed):
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    if kind == "oracle":
        return None
    torch.manual_seed(seed)
    if kind == "module":
        return AttnGate(D, Hq, Hk, hidden=16, block_size=block)
    return torch.rand(B, Hq, -(-N // block), -(-M // block), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------
# The method: equals dense when every block is kept, equals the masked reference for its mask
# ---------------------------------------------------------------------------------------------------


@given(shape=shapes(), causal=st.booleans(), block=st.sampled_from([16, 32]), keep_all=st.sampled_from(
       [{"threshold": 0.0}, {"topk_ratio": 1.0}]), gate_kind=st.sampled_from(["oracle", "module", "tensor"]),
       backend=BACKENDS, seed=SEEDS)
@settings()
def test_keeping_every_block_equals_dense(shape, causal, block, keep_all, gate_kind, backend, seed):
    q, k, v = make_qkv(shape, seed)
    fn = attnzoo.get("seerattention", block_size=block, last_blocks_dense=0, **keep_all)
    out, block_mask = fn(q, k, v, causal=causal, gate=make_gate(gate_kind, q, k, block, seed), backend=backend,
                         return_block_mask=True)
    assert (block_mask.mask == admissible_blocks(shape[3], shape[4], block, causal)).all()
    assert_close(out, attention(*doubles(q, k, v), causal=causal))


@given(shape=shapes(), causal=st.booleans(), rule=st.sampled_from(["threshold", "topk_ratio"]),
       level=st.integers(5, 90).map(lambda percent: percent / 100), last_blocks_dense=st.integers(0, 2),
       gate_kind=st.sampled_from(["oracle", "module", "tensor"]), backend=BACKENDS, seed=SEEDS)
@settings()
def test_output_and_gradients_equal_masked_reference_for_returned_mask(shape, causal, rule, level, last_blocks_dense,
                                                                       gate_kind, backend, seed):
    B, Hq, Hk, N, M, D, Dv = shape
    q, k, v = (t.requires_grad_() for t in make_qkv(shape, seed))
    fn = attnzoo.get("seerattention", block_size=16, last_blocks_dense=last_blocks_dense, **{rule: level})
    gate = make_gate(gate_kind, q, k, 16, seed)
    out, block_mask = fn(q, k, v, causal=causal, gate=gate, backend=backend, return_block_mask=True)
    assert block_mask.mask.shape == (B, Hq, -(-N // 16), -(-M // 16))
    if gate_kind != "oracle":  # the selection rule on the gate's scores (with the oracle map: see below)
        with torch.no_grad():
            scores = gate if gate_kind == "tensor" else gate(q, k, causal=causal)
        want = oracle.select_blocks(scores, N, M, block_size=16, causal=causal, last_blocks_dense=last_blocks_dense,
                                    **{rule: level})
        assert torch.equal(block_mask.mask, want.expand_as(block_mask.mask))
    _assert_forced_blocks_kept(block_mask.mask, N, M, 16, causal, last_blocks_dense)
    mask = expand_block_mask(block_mask.mask, N, M, 16, 16)
    q64, k64, v64 = doubles(q, k, v)
    expected = attention(q64, k64, v64, causal=causal, mask=mask)
    assert_close(out, expected)

    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out.double())
    for got, want in zip(grads, expected_grads):
        assert_close(got, want, rtol=2e-5)


@given(shape=shapes(max_len=40), causal=st.booleans(), backend=BACKENDS, seed=SEEDS)
@settings()
def test_every_query_that_sees_a_key_keeps_one_and_empty_rows_are_zero(shape, causal, backend, seed):
    """topk_ratio tiny: one block per row plus the forced ones; no NaN even where N > M leaves rows empty."""
    B, Hq, Hk, N, M, D, Dv = shape
    q, k, v = make_qkv(shape, seed)
    out, block_mask = attnzoo.get("seerattention", block_size=16, topk_ratio=1e-6, last_blocks_dense=0)(
        q, k, v, causal=causal, backend=backend, return_block_mask=True)
    sees_a_kept_key = (expand_block_mask(block_mask.mask, N, M, 16, 16) & visible_mask(N, M, causal=causal)).any(-1)
    assert torch.equal(sees_a_kept_key, visible_mask(N, M, causal=causal).any(-1).expand_as(sees_a_kept_key))
    assert torch.isfinite(out).all()
    assert (out[~sees_a_kept_key] == 0).all()


# ---------------------------------------------------------------------------------------------------
# Selection rules (pure torch)
# ---------------------------------------------------------------------------------------------------


@st.composite
def score_maps(draw):
    n, m = draw(st.integers(1, 120)), draw(st.integers(1, 120))
    block, causal, seed = draw(st.sampled_from([16, 32])), draw(st.booleans()), draw(SEEDS)
    scores = torch.rand(2, 3, -(-n // block), -(-m // block), generator=torch.Generator().manual_seed(seed))
    return scores, n, m, block, causal


@given(case=score_maps(), low=st.floats(0.0, 1.0), high=st.floats(0.0, 1.0), last_blocks_dense=st.integers(0, 3))
@settings()
def test_threshold_keeps_scores_at_or_above_it_plus_forced_blocks_and_nests(case, low, high, last_blocks_dense):
    scores, n, m, block, causal = case
    low, high = min(low, high), max(low, high)
    kept = {t: select_blocks(scores, n, m, block_size=block, causal=causal, threshold=t,
                             last_blocks_dense=last_blocks_dense) for t in (low, high)}
    for t, keep in kept.items():
        want = oracle.select_blocks(scores, n, m, block_size=block, causal=causal, threshold=t,
                                    last_blocks_dense=last_blocks_dense)
        assert torch.equal(keep, want)
    assert not (kept[high] & ~kept[low]).any()
    _assert_forced_blocks_kept(kept[high], n, m, block, causal, last_blocks_dense)


def _assert_forced_blocks_kept(keep, n, m, block, causal, last_blocks_dense):
    """Every query that sees a key keeps the block holding its diagonal key i + M - N (clamped into
    [0, M) when non-causal), and the last `last_blocks_dense` query-block rows keep every visible block."""
    sees = visible_mask(n, m, causal=causal)
    for i in range(n):
        if sees[i].any():
            diagonal = min(max(i + m - n, 0), m - 1)
            assert keep[..., i // block, diagonal // block].all(), (i, diagonal)
    n_qb = keep.shape[-2]
    for row in range(max(0, n_qb - last_blocks_dense), n_qb):
        assert torch.equal(keep[..., row, :], admissible_blocks(n, m, block, causal)[row].expand_as(keep[..., row, :]))


@given(case=score_maps(), percent=st.integers(1, 100), last_blocks_dense=st.integers(0, 3))
@settings()
def test_topk_keeps_the_highest_ceil_ratio_of_admissible_blocks(case, percent, last_blocks_dense):
    """Against the rule written out in attnzoo.reference.seerattention (ratio read as the decimal it
    is written as: 30% of 10 blocks is 3), and its consequences stated directly."""
    scores, n, m, block, causal = case
    ratio = percent / 100
    keep = select_blocks(scores, n, m, block_size=block, causal=causal, topk_ratio=ratio,
                         last_blocks_dense=last_blocks_dense)
    want = oracle.select_blocks(scores, n, m, block_size=block, causal=causal, topk_ratio=ratio,
                                last_blocks_dense=last_blocks_dense)
    assert torch.equal(keep, want)
    _assert_forced_blocks_kept(keep, n, m, block, causal, last_blocks_dense)
    admissible = admissible_blocks(n, m, block, causal)
    top = select_blocks(scores, n, m, block_size=block, causal=causal, topk_ratio=ratio, last_blocks_dense=0)
    for row in range(scores.shape[2]):
        count = int(admissible[row].sum())
        wanted = -(-percent * count // 100)  # ceil(percent% of count), in integers
        # at least that many blocks (the diagonal ones may add to them), none inadmissible
        assert (top[..., row, :].sum(-1) >= min(max(wanted, 1), count)).all()
        assert not (top[..., row, :] & ~admissible[row]).any()


def test_selection_by_hand():
    """Causal, N = M = 64, blocks of 16, one row of gate scores per query block; last_blocks_dense 1."""
    scores = torch.tensor([[[0.9, 0.0, 0.0, 0.0],
                            [0.2, 0.8, 0.0, 0.0],
                            [0.5, 0.1, 0.4, 0.0],
                            [0.1, 0.2, 0.3, 0.4]]])
    threshold = select_blocks(scores, 64, 64, block_size=16, causal=True, threshold=0.3, last_blocks_dense=1)
    assert torch.equal(threshold[0], picture("""
        #...
        .#..
        #.#.
        ####""")), draw(threshold[0])  # >= 0.3, plus the diagonal, plus the whole last row
    top = select_blocks(scores, 64, 64, block_size=16, causal=True, topk_ratio=0.34, last_blocks_dense=0)
    assert torch.equal(top[0], picture("""
        #...
        .#..
        #.#.
        ..##""")), draw(top[0])  # ceil(0.34 * a) of a = 1, 2, 3, 4 admissible blocks: 1, 1, 2, 2


# ---------------------------------------------------------------------------------------------------
# Distillation target and loss
# ---------------------------------------------------------------------------------------------------


@given(shape=shapes(), causal=st.booleans(), block=st.sampled_from([16, 32]), backend=BACKENDS, seed=SEEDS)
@settings()
def test_target_equals_max_pool_of_reference_softmax_map(shape, causal, block, backend, seed):
    B, Hq, Hk, N, M, D, Dv = shape
    q, k, _ = make_qkv(shape, seed)
    target = block_attention_target(q, k, block, causal, backend=backend)
    expected = reference_block_target(q, k, block, causal)
    assert_close(target, expected)
    row_sums = target.sum(-1)  # 1 for query blocks holding a query that sees a key, else 0
    block_sees_a_key = F.max_pool1d(visible_mask(N, M, causal=causal).any(-1).double()[None], block, block,
                                    ceil_mode=True)[0]
    assert_close(row_sums, block_sees_a_key.expand_as(row_sums))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_target_stays_finite_when_a_hidden_key_dominates(backend):
    # a future key scoring far above everything a query may see: exp(s - lse) overflows for it, and the
    # causal mask must remove it before (not after) the exp, or inf * 0 turns the whole map into NaN
    q, k, _ = make_qkv((1, 2, 2, 64, 64, 16, 16), 5)
    q[..., 0] += 8
    k[:, :, -1, 0] = 60
    target = block_attention_target(q, k, 16, True, backend=backend)
    assert torch.isfinite(target).all()
    assert_close(target, reference_block_target(q, k, 16, True))


def test_target_in_bf16_on_the_kernel_path():
    q, k, _ = make_qkv((1, 2, 1, 40, 40, 16, 16), 9)
    target = block_attention_target(q.bfloat16(), k.bfloat16(), 16, True, backend="triton")
    torch.testing.assert_close(target, reference_block_target(q.bfloat16().float(), k.bfloat16().float(), 16, True)
                               .float(), rtol=2e-2, atol=2e-2)


@given(shape=shapes(), causal=st.booleans(), scale=st.floats(0.05, 1.0), seed=SEEDS)
@settings()
def test_target_from_saved_lse_equals_target_from_scratch(shape, causal, scale, seed):
    q, k, v = make_qkv(shape, seed)
    _, lse = attnzoo.get("dense")(q, k, v, causal=causal, scale=scale, backend="torch", return_lse=True)
    from_lse = block_attention_target(q, k, 16, causal, scale=scale, lse=lse, backend="torch")
    torch.testing.assert_close(from_lse, block_attention_target(q, k, 16, causal, scale=scale, backend="torch"))


@given(rows=st.integers(1, 6), cols=st.integers(1, 6), seed=SEEDS)
@settings()
def test_gate_loss_is_the_kl_divergence(rows, cols, seed):
    gen = torch.Generator().manual_seed(seed)
    target = torch.softmax(torch.randn(2, rows, cols, generator=gen, dtype=torch.float64), -1)
    logits = torch.randn(2, rows, cols, generator=gen, dtype=torch.float64)
    elementwise = target * (target.log() - torch.log_softmax(logits, -1))
    torch.testing.assert_close(gate_loss(logits, target), elementwise.mean())  # the official KLDivLoss()
    torch.testing.assert_close(gate_loss(logits, target, reduction="sum"), elementwise.sum())
    torch.testing.assert_close(gate_loss(logits, target, reduction="rows"), elementwise.sum(-1).mean())
    assert gate_loss(target.log(), target).abs() < 1e-12
    with pytest.raises(ValueError, match="reduction"):
        gate_loss(logits, target, reduction="batchmean")


def test_gate_loss_skips_rows_without_target_and_masked_blocks():
    target = torch.tensor([[0.0, 0.0], [0.25, 0.75]], dtype=torch.float64)
    logits = torch.tensor([[-math.inf, -math.inf], [0.0, math.log(3.0)]], dtype=torch.float64, requires_grad=True)
    for reduction in ("mean", "sum", "rows"):
        loss = gate_loss(logits, target, reduction=reduction)
        logits.grad = None
        loss.backward()
        assert loss.abs() < 1e-12 and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------------
# AttnGate
# ---------------------------------------------------------------------------------------------------


def reference_gate_probs(gate, q_proj, k_proj, q, k, causal):
    """AttnGate written out from METHODS.md in float64 with the given weights (attnzoo.reference); the
    official layouts are checked against the official gate in tests/test_official_seerattention.py."""
    return oracle.attn_gate_probs(q_proj, k_proj, q, k, block_size=gate.block_size, hidden=gate.hidden,
                                  causal=causal, rope_base=gate.rope_base)


@given(shape=shapes(max_len=80), causal=st.booleans(), block=st.sampled_from([16, 32]), seed=SEEDS)
@settings()
def test_gate_matches_its_definition_with_parameter_gradients(shape, causal, block, seed):
    B, Hq, Hk, N, M, D, Dv = shape
    q, k, _ = make_qkv(shape, seed)
    torch.manual_seed(seed)
    gate = AttnGate(D, Hq, Hk, hidden=16, block_size=block, q_proj=True)
    probs = gate(q, k, causal=causal)
    q_proj, k_proj = (p.detach().double().requires_grad_() for p in (gate.q_proj, gate.k_proj))
    expected = reference_gate_probs(gate, q_proj, k_proj, q.double(), k.double(), causal)
    assert_close(probs, expected)
    admissible = admissible_blocks(N, M, block, causal)
    assert (probs[..., ~admissible] == 0).all()
    assert_close(probs.sum(-1), admissible.any(-1).double().expand(B, Hq, -1))

    weights = torch.randn(probs.shape, generator=torch.Generator().manual_seed(seed + 1))
    grads = torch.autograd.grad((probs * weights).sum(), (gate.q_proj, gate.k_proj))
    expected_grads = torch.autograd.grad((expected * weights.double()).sum(), (q_proj, k_proj))
    for got, want in zip(grads, expected_grads):
        assert_close(got, want)


@given(seed=SEEDS, causal=st.booleans())
@settings()
def test_a_few_optimiser_steps_lower_the_gate_loss(seed, causal):
    q, k, _ = make_qkv((1, 2, 1, 64, 64, 16, 16), seed)
    target = block_attention_target(q, k, 16, causal, backend="torch")
    torch.manual_seed(seed)
    gate = AttnGate(16, 2, 1, hidden=16, block_size=16)
    optimizer = torch.optim.Adam(gate.parameters(), lr=1e-2)  # 3e-2 overshoots on about 1 seed in 200
    losses = []
    for _ in range(10):
        loss = gate_loss(gate.logits(q, k, causal=causal), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("params, match", [
    ({"threshold": 0.1, "topk_ratio": 0.5}, "at most one of threshold"),
    ({"threshold": 1.5}, r"threshold must be a float in \[0, 1\]"),
    ({"topk_ratio": 0.0}, r"topk_ratio must be a float in \(0, 1\]"),
    ({"topk_ratio": 0.5, "block_size": 24}, "block_size must be a power of two >= 16, got 24"),
    ({"topk_ratio": 0.5, "last_blocks_dense": -1}, "last_blocks_dense must be an int >= 0"),
    ({"topk_ratio": 0.5, "gate": torch.rand(1, 2, 2, 3)}, r"gate has shape \(1, 2, 2, 3\)"),
    ({"topk_ratio": 0.5, "gate": "gate"}, "gate must be None, an AttnGate"),
    ({"topk_ratio": 0.5, "gate": AttnGate(16, 2, 2, hidden=16, block_size=32)}, "gate has block_size=32"),
])
def test_invalid_selection_raises_naming_the_argument(params, match):
    q, k, v = make_qkv((1, 2, 2, 20, 20, 16, 16), seed=0)
    with pytest.raises((ValueError, TypeError), match=match):
        attnzoo.get("seerattention", block_size=params.pop("block_size", 16))(
            q, k, v, causal=True, backend="torch", **params)


def test_registry_defaults_run_with_q_k_v_only():
    """No gate, no selection: the oracle scores with the default threshold (5e-4, the official README's
    prefill setting), so blocks under it are dropped and the output is the masked reference's."""
    q, k, v = make_qkv((1, 2, 1, 200, 200, 16, 16), seed=4)
    out, block_mask = attnzoo.get("seerattention")(q, k, v, causal=True, return_block_mask=True, backend="torch")
    target = oracle.block_target(q, k, 64, causal=True)
    want = oracle.select_blocks(target, 200, 200, block_size=64, causal=True, threshold=5e-4)
    assert torch.equal(block_mask.to_dense(), want)
    mask = expand_block_mask(want, 200, 200, 64, 64)
    assert_close(out, attention(q.double(), k.double(), v.double(), causal=True, mask=mask))


def test_topk_ratio_keeps_exactly_ratio_times_the_admissible_blocks():
    """topk_ratio 0.3 of 10 admissible blocks keeps 3 (0.3 * 10 is 3.0000000000000004 in floats: the
    rounding must not add a fourth). One query block, scores chosen so its diagonal block (9) is first."""
    q, k, v = torch.randn(1, 1, 16, 16), torch.randn(1, 1, 160, 16), torch.randn(1, 1, 160, 16)
    scores = torch.tensor([0.9, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 1.0]).view(1, 1, 1, 10)
    fn = attnzoo.get("seerattention", topk_ratio=0.3, block_size=16, last_blocks_dense=0)
    _, block_mask = fn(q, k, v, causal=False, gate=scores, backend="torch", return_block_mask=True)
    assert block_mask.to_dense()[0, 0, 0].tolist() == [True, True] + [False] * 7 + [True]


def test_gate_scores_of_batch_one_serve_every_batch_element():
    """Scores (1, Hq, nQB, nKB) broadcast over a batch of 3: every element keeps the same blocks."""
    q, k, v = torch.randn(3, 2, 32, 16), torch.randn(3, 2, 64, 16), torch.randn(3, 2, 64, 16)
    scores = torch.rand(1, 2, 2, 4)
    fn = attnzoo.get("seerattention", topk_ratio=0.5, block_size=16, last_blocks_dense=0)
    _, block_mask = fn(q, k, v, causal=False, gate=scores, backend="torch", return_block_mask=True)
    kept = block_mask.to_dense().expand(3, 2, 2, 4)
    assert torch.equal(kept[1], kept[0]) and torch.equal(kept[2], kept[0])
