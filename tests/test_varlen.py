"""Packed variable-length sequences (cu_seqlens): for every method, a packed call equals the per-sequence
calls on each sequence's own inputs, concatenated (outputs, optional outputs, block choice, gradients),
on the torch backend and under the Triton interpreter; dense packs equal the float64 oracle per sequence;
edge cases (empty sequences, N_s != M_s, a thousand short sequences) and bad offsets raise clear errors.

Each case draws S sequences, builds every sequence's inputs on its own, then packs them (tokens end to
end, block grids into the top-left corner of an (S, H, ceil(max / block), ...) grid): the pack is made
from the sequences, never the sequences cut from the pack by attnzoo's code."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from triton.runtime.interpreter import GridExecutor

import attnzoo
from attnzoo.methods.seerattention import AttnGate
from attnzoo.reference.dense import attention as reference_attention

BACKENDS = st.sampled_from(["torch", "triton"])
D = 16
BLOCK = 16
LINEAR = {"gla", "based", "lawcat", "wersa"}
FLAG = {"dense": "return_lse", "gla": "output_final_state", "block_sparse": "return_block_mask",
        "xattention": "return_block_mask", "s2": "return_block_mask", "sparsed": "return_block_mask",
        "seerattention": "return_block_mask"}
PARAMS = {"block_sparse": {"block_size": BLOCK}, "xattention": {"block_size": BLOCK, "stride": 4},
          "s2": {"block_size": BLOCK, "local_blocks": 1, "vert_stride": 2}, "sparsed": {"block_size": BLOCK},
          "seerattention": {"block_size": BLOCK, "threshold": 0.05}, "flashbias": {"rank": None},
          "gla": {"chunk_size": 16}, "based": {"chunk_size": 16}, "lawcat": {"chunk_size": 16},
          "wersa": {"chunk_size": 16, "num_features": 32}, "dense": {"window_size": (5, 3)}}
GRADS = ("q", "k", "v", "g", "bias")


def cu_seqlens(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32)


def qk_dim(name: str) -> int:
    """The q / k head dim of a case: BASED's Taylor features grow as D^2 / 2, so it gets 8 (45 features)."""
    return 8 if name == "based" else D


def shared_inputs(name: str, hq: int, hk: int, gen) -> dict:
    """Per-head inputs every sequence of a pack shares (lawcat's causal conv kernels)."""
    if name == "lawcat":
        return {"conv_q": torch.randn(hq, D, 3, generator=gen) / 2, "conv_k": torch.randn(hk, D, 3, generator=gen) / 2}
    return {}


def sequence_inputs(name: str, n: int, m: int, hq: int, hk: int, gen) -> dict:
    """One sequence's q, k, v and its call-time inputs, (1, H, n | m, ...)."""
    q = torch.randn(1, hq, n, qk_dim(name), generator=gen)
    k = torch.randn(1, hk, m, qk_dim(name), generator=gen)
    v = torch.randn(1, hk, m, D, generator=gen)
    own = {"q": q, "k": k, "v": v}
    if name == "dense":
        own["bias"] = torch.randn(1, hq, n, m, generator=gen)
    if name == "block_sparse":
        own["block_mask"] = torch.rand(1, hq, -(-n // BLOCK), -(-m // BLOCK), generator=gen) < 0.6
    if name == "flashbias":
        own["bias_factors"] = (torch.randn(1, hq, n, 2, generator=gen), torch.randn(1, hk, m, 2, generator=gen))
    if name == "gla":
        own["g"] = F.logsigmoid(torch.randn(1, hk, n, D, generator=gen) + 2)
        own["initial_state"] = torch.randn(1, hk, D, D, generator=gen)
    if name == "lawcat":
        own["g"] = F.logsigmoid(torch.randn(1, hk, n, generator=gen) + 2)
    if name == "wersa":
        own["gains"] = torch.rand(1, n, 3, generator=gen) + 0.5
    return own


def pad_grid(grids: list[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """Sequence grids (1, H, r_s, c_s) in the top-left corners of one (S, H, rows, cols) grid; the rest
    is filled with True, which a sequence must never read."""
    out = torch.ones(len(grids), grids[0].shape[1], rows, cols, dtype=grids[0].dtype)
    for s, grid in enumerate(grids):
        out[s, :, :grid.shape[2], :grid.shape[3]] = grid[0]
    return out


def pack(name: str, sequences: list[dict], q_lengths: list[int], k_lengths: list[int]) -> dict:
    """The packed call's tensors and keywords, made from the sequences' own."""
    packed = {key: torch.cat([s[key] for s in sequences], dim=2) for key in ("q", "k", "v")}
    if name == "dense":
        bias = torch.full((1, sequences[0]["q"].shape[1], sum(q_lengths), sum(k_lengths)), float("nan"))
        for s, (qa, ka) in enumerate(zip(cu_seqlens(q_lengths)[:-1].tolist(), cu_seqlens(k_lengths)[:-1].tolist())):
            bias[:, :, qa:qa + q_lengths[s], ka:ka + k_lengths[s]] = sequences[s]["bias"]
        packed["bias"] = bias  # NaN off the diagonal blocks: no sequence may read another's bias
    if name == "block_sparse":
        packed["block_mask"] = pad_grid([s["block_mask"] for s in sequences], -(-max(q_lengths) // BLOCK),
                                        -(-max(k_lengths) // BLOCK))
    if name == "flashbias":
        packed["bias_factors"] = tuple(torch.cat([s["bias_factors"][i] for s in sequences], dim=2) for i in (0, 1))
    if name in ("gla", "lawcat"):
        packed["g"] = torch.cat([s["g"] for s in sequences], dim=2)
    if name == "gla":
        packed["initial_state"] = torch.cat([s["initial_state"] for s in sequences], dim=0)
    if name == "wersa":
        packed["gains"] = torch.cat([s["gains"] for s in sequences], dim=1)
    return packed


def call(name, tensors: dict, *, causal, backend, **extra):
    inputs = {key: value for key, value in tensors.items() if key not in ("q", "k", "v")}
    return attnzoo.get(name, **PARAMS.get(name, {}))(tensors["q"], tensors["k"], tensors["v"], causal=causal,
                                                     backend=backend, **inputs, **extra)


def with_grad(tensors: dict) -> dict:
    return {key: (value.clone().requires_grad_(True) if key in GRADS else value) for key, value in tensors.items()}


def grads(tensors: dict) -> dict:
    return {key: value.grad for key, value in tensors.items() if key in GRADS and value.grad is not None}


def draw_lengths(data, name: str) -> tuple[list[int], list[int]]:
    """S lengths of 0 to 32 for q and for k (the same for linear methods); the first sequence is not empty."""
    count = data.draw(st.integers(1, 4))
    q_lengths = [data.draw(st.integers(1, 32))] + data.draw(st.lists(st.integers(0, 32), min_size=count - 1,
                                                                     max_size=count - 1))
    if name in LINEAR:
        return q_lengths, q_lengths
    k_lengths = [data.draw(st.integers(1, 32))] + data.draw(st.lists(st.integers(0, 32), min_size=count - 1,
                                                                     max_size=count - 1))
    return q_lengths, k_lengths


@pytest.mark.parametrize("name", attnzoo.list_methods())
@given(data=st.data(), backend=BACKENDS, seed=st.integers(0, 2**31 - 1))
@settings(max_examples=3)
def test_a_pack_equals_its_sequences_called_alone(name, data, backend, seed):
    info = attnzoo.info(name)
    causal = data.draw(st.booleans()) if info.supports.causal and info.supports.non_causal else info.supports.causal
    q_lengths, k_lengths = draw_lengths(data, name)
    hk = data.draw(st.integers(1, 2))
    hq = hk * data.draw(st.integers(1, 2))
    gen = torch.Generator().manual_seed(seed)
    shared = shared_inputs(name, hq, hk, gen)
    sequences = [with_grad({**sequence_inputs(name, n, m, hq, hk, gen), **shared})
                 for n, m in zip(q_lengths, k_lengths)]
    packed = with_grad({**pack(name, [{k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
                                      for s in sequences], q_lengths, k_lengths), **shared})
    flag = {FLAG[name]: True} if name in FLAG else {}

    got = call(name, packed, causal=causal, backend=backend, cu_seqlens_q=cu_seqlens(q_lengths),
               cu_seqlens_k=cu_seqlens(k_lengths), **flag)
    alone = [call(name, s, causal=causal, backend=backend, **flag) if n and m else None
             for s, n, m in zip(sequences, q_lengths, k_lengths)]

    out, extra = got if flag else (got, None)
    weights = torch.randn(out.shape, generator=gen)
    want_out = torch.cat([(a[0] if flag else a) if a is not None else torch.zeros(1, hq, n, D)
                          for a, n in zip(alone, q_lengths)], dim=2)
    torch.testing.assert_close(out, want_out, rtol=1e-6, atol=1e-6)
    if flag:
        check_extra(name, extra, alone, sequences, q_lengths)
    (out * weights).sum().backward()
    offset = 0
    for a, s, n in zip(alone, sequences, q_lengths):
        if a is not None:
            ((a[0] if flag else a) * weights[:, :, offset:offset + n]).sum().backward()
        offset += n
    for key, packed_grad in grads(packed).items():
        if key == "bias":  # each sequence's diagonal block of the packed bias
            starts = zip(cu_seqlens(q_lengths).tolist(), cu_seqlens(k_lengths).tolist())
            for (qa, ka), s, n, m in zip(starts, sequences, q_lengths, k_lengths):
                if n and m:
                    torch.testing.assert_close(packed_grad[..., qa:qa + n, ka:ka + m], s["bias"].grad,
                                               rtol=1e-5, atol=1e-5)
            continue
        want = torch.cat([s[key].grad if s[key].grad is not None else torch.zeros_like(s[key]) for s in sequences],
                         dim=2)
        torch.testing.assert_close(packed_grad, want, rtol=1e-5, atol=1e-5, msg=key)


def check_extra(name, extra, alone, sequences, q_lengths):
    if name == "dense":  # lse (1, Hq, total_q); a sequence without keys has lse -inf
        want = torch.cat([a[1] if a is not None else torch.full((1, extra.shape[1], n), float("-inf"))
                          for a, n in zip(alone, q_lengths)], dim=2)
        torch.testing.assert_close(extra, want, rtol=1e-6, atol=1e-6)
    elif name == "gla":  # final states (S, Hk, D, Dv); an empty sequence keeps its initial state
        want = torch.cat([a[1] if a is not None else s["initial_state"].detach() for a, s in zip(alone, sequences)])
        torch.testing.assert_close(extra, want, rtol=1e-6, atol=1e-6)
    else:  # one block mask per sequence, the very blocks it chose alone
        assert len(extra) == len(alone)
        for got, a in zip(extra, alone):
            assert (got is None) == (a is None)
            if a is not None:
                assert torch.equal(got.mask, a[1].mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_dense_pack_equals_the_float64_oracle_per_sequence(backend):
    """Bottom-right causal alignment and windows per sequence, N_s != M_s, lengths 0 and 1 and ragged ones."""
    q_lengths, k_lengths = [7, 0, 1, 33, 20, 5], [12, 3, 1, 17, 0, 40]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, sum(q_lengths), D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, sum(k_lengths), D, generator=gen, dtype=torch.float64) for _ in range(2))
    got = attnzoo.get("dense", window_size=(6, -1))(q.float(), k.float(), v.float(), causal=True, backend=backend,
                                                     cu_seqlens_q=cu_seqlens(q_lengths),
                                                     cu_seqlens_k=cu_seqlens(k_lengths))
    pieces, qa, ka = [], 0, 0
    for n, m in zip(q_lengths, k_lengths):
        if m == 0:
            pieces.append(torch.zeros(1, 4, n, D, dtype=torch.float64))  # no key: zero rows
        else:
            pieces.append(reference_attention(q[:, :, qa:qa + n], k[:, :, ka:ka + m], v[:, :, ka:ka + m],
                                              causal=True, scale=D ** -0.5, window_size=(6, -1)))
        qa, ka = qa + n, ka + m
    assert (got.double() - torch.cat(pieces, dim=2)).abs().max() < 2e-6


def test_a_thousand_short_sequences():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 9, (1000,), generator=gen).tolist()
    q, k, v = (torch.randn(1, 2, sum(lengths), D, generator=gen) for _ in range(3))
    for name, count in (("dense", 1000), ("gla", 200)):  # gla: fewer, its chunked form costs more per call
        cu = cu_seqlens(lengths[:count])
        q, k, v = (t[:, :, :cu[-1]] for t in (q, k, v))
        got = attnzoo.get(name)(q, k, v, causal=True, backend="torch", cu_seqlens_q=cu, cu_seqlens_k=cu)
        for s in (0, 1, count // 2, count - 1):  # spot checks: each sequence on its own
            a, b = cu[s].item(), cu[s + 1].item()
            alone = attnzoo.get(name)(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], causal=True, backend="torch")
            torch.testing.assert_close(got[:, :, a:b], alone, rtol=1e-6, atol=1e-6)


def test_max_seqlen_sizes_the_block_grid():
    q = torch.randn(1, 2, 40, D)
    cu = cu_seqlens([8, 32])
    mask = torch.ones(2, 1, 3, 3, dtype=torch.bool)  # max_seqlen 48 -> 3 blocks of 16
    fn = attnzoo.get("block_sparse", block_size=BLOCK)
    out = fn(q, q, q, block_mask=mask, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=48, max_seqlen_k=48)
    torch.testing.assert_close(out, attnzoo.get("dense")(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu))
    with pytest.raises(ValueError, match=r"block_mask for a pack of 2 sequences must have shape \(2, H\|1, 2, 2\)"):
        fn(q, q, q, block_mask=mask, cu_seqlens_q=cu, cu_seqlens_k=cu)


@pytest.mark.parametrize("bad, match", [
    ({"cu_seqlens_q": torch.tensor([0, 4, 10])}, "int32"),
    ({"cu_seqlens_q": torch.tensor([0, 6, 4, 10], dtype=torch.int32)}, "non-decreasing"),
    ({"cu_seqlens_q": torch.tensor([1, 4, 10], dtype=torch.int32)}, "must start at 0"),
    ({"cu_seqlens_q": torch.tensor([0, 4, 9], dtype=torch.int32)}, "must end at the packed length 10, got 9"),
    ({"cu_seqlens_q": torch.tensor([0, 10], dtype=torch.int32)}, "same number of sequences, got 1 and 2"),
    ({"cu_seqlens_q": torch.tensor([[0, 4, 10]], dtype=torch.int32)}, r"shape \(S \+ 1,\)"),
    ({"cu_seqlens_k": None}, "needs both cu_seqlens_q and cu_seqlens_k"),
    ({"max_seqlen_q": 5}, "max_seqlen_q=5 is shorter than the longest sequence"),
    ({"max_seqlen_k": 6.0}, "max_seqlen_k must be an int"),
])
def test_bad_offsets_are_refused(bad, match):
    q = torch.randn(1, 2, 10, D)
    offsets = {"cu_seqlens_q": cu_seqlens([4, 6]), "cu_seqlens_k": cu_seqlens([4, 6]), **bad}
    with pytest.raises((TypeError, ValueError), match=match):
        attnzoo.get("dense")(q, q, q, **offsets)


def test_a_batched_pack_and_sparsed_cache_are_refused():
    q = torch.randn(2, 2, 10, D)
    cu = cu_seqlens([4, 6])
    with pytest.raises(ValueError, match=r"q of shape \(1, H, total, D\)"):
        attnzoo.get("dense")(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu)
    with pytest.raises(ValueError, match="cache is not supported in a packed call"):
        attnzoo.get("sparsed")(q[:1], q[:1], q[:1], cache=object(), cu_seqlens_q=cu, cu_seqlens_k=cu)


# ---------------------------------------------------------------------------------------------------
# one launch for the whole pack, and the method variants the property test above does not draw


def pack_of(lengths_q: list[int], lengths_k: list[int], hq: int, hk: int, gen, dim: int = D):
    q = torch.randn(1, hq, sum(lengths_q), dim, generator=gen, requires_grad=True)
    k = torch.randn(1, hk, sum(lengths_k), dim, generator=gen, requires_grad=True)
    v = torch.randn(1, hk, sum(lengths_k), D, generator=gen, requires_grad=True)
    return q, k, v, {"cu_seqlens_q": cu_seqlens(lengths_q), "cu_seqlens_k": cu_seqlens(lengths_k)}


@pytest.fixture
def launches(monkeypatch):
    """Every Triton launch under the interpreter, counted by kernel name."""
    counts = collections.Counter()
    launch = GridExecutor.__call__

    def counted(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return launch(self, *args, **kwargs)

    monkeypatch.setattr(GridExecutor, "__call__", counted)
    return counts


@pytest.mark.parametrize("name", attnzoo.list_methods())
def test_a_pack_runs_in_launches_independent_of_its_sequence_count(name, launches):
    info = attnzoo.info(name)
    causal = info.supports.causal
    gen = torch.Generator().manual_seed(3)
    counted = {}
    for q_lengths, k_lengths in (([9, 17], [12, 17]), ([9, 17, 3, 12, 1, 6], [12, 17, 5, 12, 2, 20])):
        if name in LINEAR:
            k_lengths = q_lengths
        sequences = [sequence_inputs(name, n, m, 2, 1, gen) for n, m in zip(q_lengths, k_lengths)]
        inputs = {key: value for key, value in pack(name, sequences, q_lengths, k_lengths).items()
                  if key not in ("q", "k", "v")}
        q, k, v, offsets = pack_of(q_lengths, k_lengths, 2, 1, gen, qk_dim(name))
        launches.clear()
        out = call(name, {"q": q, "k": k, "v": v, **inputs}, causal=causal, backend="triton", **offsets)
        if info.supports.backward:
            out.sum().backward()
        counted[len(q_lengths)] = dict(launches)
    assert counted[2] == counted[6], counted  # the same kernels, as often, for 2 sequences as for 6
    assert sum(counted[2].values()) > 0


VARIANTS = {  # name -> (parameters, extra inputs built per sequence, causal)
    "xattention-official": ("xattention", {"block_size": BLOCK, "stride": 4, "selection": "official",
                                           "chunk_size": 32, "threshold": 0.8}, True),
    "xattention-official-bidirectional": ("xattention", {"block_size": BLOCK, "stride": 4, "selection": "official",
                                                         "chunk_size": 32, "threshold": 0.8}, False),
    "sparsed-generation": ("sparsed", {"block_size": BLOCK, "gen_len": 4}, False),
    "seerattention-topk": ("seerattention", {"block_size": BLOCK, "topk_ratio": 0.5, "last_blocks_dense": 1}, True),
    "flashbias-alibi": ("flashbias", {}, True),
    "flashbias-full-bias": ("flashbias", {"rank": None}, False),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_pack_of_each_variant_equals_its_sequences_called_alone(variant, backend):
    name, params, causal = VARIANTS[variant]
    q_lengths, k_lengths = [20, 0, 33, 9], [25, 4, 33, 40]
    gen = torch.Generator().manual_seed(5)
    q, k, v, offsets = pack_of(q_lengths, k_lengths, 2, 1, gen)
    fn = attnzoo.get(name, **params)
    inputs, pieces = {}, []
    if variant == "flashbias-alibi":
        inputs = {"alibi_slopes": torch.rand(2, generator=gen)}
    if variant == "flashbias-full-bias":  # NaN off the diagonal blocks: no sequence may read another's bias
        inputs = {"bias": torch.full((1, 2, sum(q_lengths), sum(k_lengths)), float("nan"))}
        pieces = [torch.randn(1, 2, n, m, generator=gen) for n, m in zip(q_lengths, k_lengths)]
        for s, piece in enumerate(pieces):
            inputs["bias"][..., cu_seqlens(q_lengths)[s]:cu_seqlens(q_lengths)[s + 1],
                           cu_seqlens(k_lengths)[s]:cu_seqlens(k_lengths)[s + 1]] = piece
    if name == "seerattention":
        inputs = {"gate": AttnGate(D, 2, 1, block_size=BLOCK, hidden=8)}
    flag = {} if name == "flashbias" else {"return_block_mask": True}
    got = fn(q, k, v, causal=causal, backend=backend, **inputs, **offsets, **flag)
    out, masks = got if flag else (got, None)
    qa, ka = cu_seqlens(q_lengths).tolist(), cu_seqlens(k_lengths).tolist()
    for s, (n, m) in enumerate(zip(q_lengths, k_lengths)):
        if not (n and m):
            assert torch.equal(out[:, :, qa[s]:qa[s + 1]], torch.zeros(1, 2, n, D))
            continue
        own = dict(inputs, bias=pieces[s]) if pieces else inputs
        alone = fn(q[:, :, qa[s]:qa[s + 1]], k[:, :, ka[s]:ka[s + 1]], v[:, :, ka[s]:ka[s + 1]], causal=causal,
                   backend=backend, **own, **flag)
        torch.testing.assert_close(out[:, :, qa[s]:qa[s + 1]], alone[0] if flag else alone, rtol=1e-6, atol=1e-6)
        if flag:
            assert torch.equal(masks[s].mask, alone[1].mask), (variant, s)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["dense", "xattention", "block_sparse", "gla"])
def test_cuda_bf16_pack_equals_its_sequences(name):
    """The compiled kernels (autotuned tiles, TMA on sm_90) on a pack of 12 long-tailed sequences: the
    pack against each sequence called alone, forward and gradients, within bf16 rounding (the tiles a
    pack and a single sequence autotune to may differ)."""
    gen = torch.Generator().manual_seed(7)
    lengths = (16 + 2000 * torch.rand(12, generator=gen) ** 3).long().tolist()
    params = {"xattention": {"block_size": 64}, "block_sparse": {"block_size": 64}}.get(name, {})
    fn = attnzoo.get(name, **params)
    q, k, v = (torch.randn(1, h, sum(lengths), 64, generator=gen).to("cuda", torch.bfloat16).requires_grad_()
               for h in (8, 2, 2))
    extra = {}
    if name == "block_sparse":
        grid = -(-max(lengths) // 64)
        extra["block_mask"] = (torch.rand(12, 8, grid, grid, generator=gen) < 0.5).cuda()
    cu = cu_seqlens(lengths).cuda()
    out = fn(q, k, v, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, **extra)
    weights = torch.randn(out.shape, generator=gen).to("cuda", torch.bfloat16)
    packed_grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    starts = cu.tolist()
    for s, (a, b) in enumerate(zip(starts, starts[1:])):
        own = {"block_mask": extra["block_mask"][s:s + 1, :, :-(-(b - a) // 64), :-(-(b - a) // 64)]} if extra else {}
        views = [x.detach()[:, :, a:b].requires_grad_() for x in (q, k, v)]
        alone = fn(*views, causal=True, **own)
        torch.testing.assert_close(out[:, :, a:b].float(), alone.float(), rtol=2e-2, atol=2e-2)
        grads = torch.autograd.grad((alone * weights[:, :, a:b]).sum(), views)
        for packed_grad, grad in zip(packed_grads, grads):
            torch.testing.assert_close(packed_grad[:, :, a:b].float(), grad.float(), rtol=5e-2, atol=5e-2)


def test_a_registered_method_without_pack_runs_one_sequence_at_a_time():
    """A third-party function that takes no `pack` gets each sequence on its own, its per-token inputs
    cut to the sequence (`g`: (1, H, total)); an input the split does not know is refused by name; a
    pack in which no sequence has both queries and keys outputs zeros without a call."""
    seen = []

    def gated_sdpa(q, k, v, *, causal, scale, backend, g=None, extra=None):
        seen.append(q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, scale=scale) * g[..., None]

    attnzoo.register("varlen_probe", gated_sdpa, family="exact", inputs=("g", "extra"), supports={"causal": False})
    try:
        fn = attnzoo.get("varlen_probe")
        lengths = [5, 0, 11]
        q, k, v, offsets = pack_of(lengths, lengths, 2, 2, torch.Generator().manual_seed(0))
        g = torch.rand(1, 2, sum(lengths))
        out = fn(q, k, v, g=g, **offsets)
        assert seen == [5, 11]
        for a, b in ((0, 5), (5, 16)):
            want = F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b]) * g[:, :, a:b, None]
            torch.testing.assert_close(out[:, :, a:b], want)
        with pytest.raises(ValueError, match="does not know how to split 'extra'"):
            fn(q, k, v, g=g, extra=torch.ones(3), **offsets)
        empty = fn(q[:, :, :4], k[:, :, :0], v[:, :, :0], g=g[:, :, :0], cu_seqlens_q=cu_seqlens([4, 0]),
                   cu_seqlens_k=cu_seqlens([0, 0]))
        assert torch.equal(empty, torch.zeros(1, 2, 4, D)) and seen == [5, 11]
    finally:
        attnzoo.registry.REGISTRY._entries().pop("varlen_probe")
