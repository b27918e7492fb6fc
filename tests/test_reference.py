"""attnzoo.reference: `exact_output` against every registered method, and the oracles' own facts
(each stated literally or checked against a second, independent formulation)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import attnzoo
from attnzoo import reference
from attnzoo.reference import exact_output
from attnzoo.reference import based as based_oracle
from attnzoo.reference import s2 as s2_oracle
from attnzoo.reference import wersa as wersa_oracle
from attnzoo.reference import xattention as xattention_oracle
from attnzoo.reference.blocks import every_query_diagonal_blocks, last_query_diagonal_blocks
from attnzoo.reference.linear import quadratic_linear_attention, recurrent_linear_attention
from pictures import picture

BACKENDS = st.sampled_from(["triton", "torch"])
LINEAR = {"gla", "based", "lawcat", "wersa"}


def _case(name, draw, q, k, causal, gen):
    """(params, inputs) for one call of `name` on q, k: the method's own knobs, drawn."""
    B, Hq, N, D = q.shape
    Hk, M = k.shape[1], k.shape[2]
    n_qb, n_kb = -(-N // 16), -(-M // 16)
    if name == "dense":
        return {"window_size": (draw(st.integers(-1, 8)), draw(st.integers(-1, 8))),
                "softcap": draw(st.sampled_from([0.0, 2.5]))}, {}
    if name == "block_sparse":
        return {"block_size": 16}, {"block_mask": torch.rand(B, Hq, n_qb, n_kb, generator=gen) < 0.6}
    if name == "xattention":
        return {"block_size": 16, "stride": draw(st.sampled_from([1, 4, 16])),
                "threshold": draw(st.floats(0.0, 1.0))}, {}
    if name == "s2":
        return {"block_size": 16, "local_blocks": draw(st.integers(1, 2)), "vert_stride": draw(st.integers(1, 3)),
                "num_dense_heads": draw(st.integers(0, 1)) if Hk > 1 else 0,
                "head_sliding_offset": draw(st.integers(0, 2))}, {}
    if name == "sparsed":
        return {"block_size": 16, "select": draw(st.floats(0.0, 1.0)),
                "gen_len": draw(st.none() | st.integers(1, M))}, {}
    if name == "seerattention":
        gate = torch.rand(B, Hq, n_qb, n_kb, generator=gen)
        return {"block_size": 16, "topk_ratio": draw(st.integers(1, 100)) / 100,
                "last_blocks_dense": draw(st.integers(0, 1))}, {"gate": gate}
    if name == "flashbias":
        rank = draw(st.integers(1, 4))
        u = torch.randn(B, Hq, N, rank, generator=gen) / rank ** 0.5
        w = torch.randn(1, draw(st.sampled_from([1, Hk])), M, rank, generator=gen)
        return {"rank": None}, {"bias_factors": (u, w)}
    if name == "gla":
        return {"chunk_size": 16}, {"g": F.logsigmoid(torch.randn(B, Hk, N, D, generator=gen) + 2),  # per kv head
                                    "initial_state": torch.randn(B, Hk, D, D, generator=gen)}
    if name == "based":
        return {"chunk_size": 16, "use_norm": draw(st.booleans())}, {}
    if name == "lawcat":
        return {"chunk_size": 16, "feature_map": "elu1"}, {
            "g": F.logsigmoid(torch.randn(B, Hk, N, generator=gen) + 2),  # g and conv_k per kv head
            "conv_q": torch.rand(Hq, D, 3, generator=gen), "conv_k": torch.rand(Hk, D, 3, generator=gen)}
    assert name == "wersa", name
    levels = draw(st.integers(0, 3))
    return {"chunk_size": 16, "levels": levels, "num_features": 32,
            "gains": torch.rand(B, N, levels + 1, generator=gen) + 0.5}, {}


@pytest.mark.parametrize("name", attnzoo.list_methods())
@given(data=st.data(), backend=BACKENDS, seed=st.integers(0, 2**31 - 1))
@settings(max_examples=6)
def test_every_method_equals_its_exact_output(name, data, backend, seed):
    """The method's output equals `exact_output` on drawn shapes (GQA, N != M where supported); sparse
    methods are given the blocks they returned, except s2 and seerattention with a gate tensor, whose
    choice the oracle makes itself from the same inputs."""
    info = attnzoo.info(name)
    draw = data.draw
    causal = draw(st.booleans()) if info.supports.causal and info.supports.non_causal else info.supports.causal
    kv_heads = draw(st.integers(1, 2))
    q_heads = kv_heads * (draw(st.integers(1, 2)) if info.supports.gqa else 1)
    n = draw(st.integers(1, 40))
    m = n if name in LINEAR else draw(st.integers(1, 40))
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(draw(st.integers(1, 2)), q_heads, n, 16, generator=gen)
    k, v = (torch.randn(q.shape[0], kv_heads, m, 16, generator=gen) for _ in range(2))
    params, inputs = _case(name, draw, q, k, causal, gen)
    wants_mask = "return_block_mask" in info.supports.outputs
    result = attnzoo.get(name, **params)(q, k, v, causal=causal, backend=backend, **inputs,
                                         **({"return_block_mask": True} if wants_mask else {}))
    out, chosen = result if wants_mask else (result, None)
    block_mask = None if chosen is None or name in ("s2", "seerattention") else chosen
    want = exact_output(name, q, k, v, causal=causal, scale=16 ** -0.5, params={**info.params, **params},
                        inputs=inputs, block_mask=block_mask)
    assert want.dtype == torch.float64 and want.shape == out.shape
    error = (out.double() - want).abs().max().item() / max(want.abs().max().item(), 1.0)
    assert error < 2e-5, error


def test_exact_output_names_the_known_methods_for_an_unknown_one():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(KeyError, match="no oracle for method 'nope'; known methods: based, block_sparse, dense"):
        exact_output("nope", q, q, q, causal=False, scale=0.25, params={}, inputs={})
    assert set(reference.known_methods()) == set(attnzoo.list_methods())


def test_exact_output_accepts_a_block_mask_pair_and_gives_zero_rows_for_nothing_kept():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=gen) for _ in range(3))
    everything = (torch.ones(1, 1, 2, 2, dtype=torch.bool), (16, 16))
    for name in ("block_sparse", "xattention", "s2", "sparsed", "seerattention"):
        got = exact_output(name, q, k, v, causal=False, scale=0.25, params={}, inputs={}, block_mask=everything)
        torch.testing.assert_close(got, reference.attention(q.double(), k.double(), v.double(), scale=0.25),
                                   rtol=0, atol=0)
    nothing = (picture("#.\n..")[None, None], 16)
    got = exact_output("block_sparse", q, k, v, causal=False, scale=0.25, params={}, inputs={}, block_mask=nothing)
    assert (got[:, :, 16:] == 0).all() and (got[:, :, :16] != 0).all()


# ---------------------------------------------------------------------------------------------------
# The oracles' own facts
# ---------------------------------------------------------------------------------------------------


@given(n=st.integers(1, 12), causal=st.booleans(), normalize=st.booleans(), seed=st.integers(0, 2**31 - 1))
@settings()
def test_recurrence_equals_the_quadratic_form(n, causal, normalize, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.rand(2, 3, n, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 3, n, 4, generator=gen, dtype=torch.float64)
    recurrent = recurrent_linear_attention(q, k, v, causal=causal, normalize=normalize, eps=0.1)[0]
    quadratic = quadratic_linear_attention(q @ k.transpose(-1, -2), v, causal=causal, normalize=normalize, eps=0.1)
    assert (recurrent - quadratic).abs().max() < 1e-12


@given(n=st.integers(1, 10), d=st.integers(1, 6), scale=st.floats(0.01, 2.0), seed=st.integers(0, 2**31 - 1))
@settings()
def test_taylor_features_give_the_taylor_kernel(n, d, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, n, d, generator=gen, dtype=torch.float64) for _ in range(2))
    features = based_oracle.taylor_features(q, scale) @ based_oracle.taylor_features(k, scale).transpose(-1, -2)
    s = scale * q @ k.transpose(-1, -2)
    assert based_oracle.taylor_features(q).shape[-1] == 1 + d + d * d
    assert (features - (1 + s + s ** 2 / 2)).abs().max() < 1e-10
    assert (based_oracle.taylor_kernel(q, k, scale) - (1 + s + s ** 2 / 2)).abs().max() < 1e-12


def test_haar_by_hand():
    """One level of orthonormal Haar on [1, 3, 5, 11]: details (x0 - x1) / sqrt 2, averages (x0 + x1) / sqrt 2."""
    x = torch.tensor([1.0, 3.0, 5.0, 11.0], dtype=torch.float64)[None, None, :, None]
    detail, approx = wersa_oracle.haar_dwt(x, 1)
    r = 2 ** 0.5
    torch.testing.assert_close(detail.flatten(), torch.tensor([-2 / r, -6 / r], dtype=torch.float64))
    torch.testing.assert_close(approx.flatten(), torch.tensor([4 / r, 16 / r], dtype=torch.float64))
    torch.testing.assert_close(wersa_oracle.haar_idwt([detail, approx]), x)
    assert [wersa_oracle.padded_length(n, 2) for n in (1, 4, 5, 8, 9)] == [4, 4, 8, 8, 16]


def test_per_token_gains_are_read_at_the_nearest_earlier_token():
    """N = 6 padded to 8, one level: the detail band has 4 coefficients, coefficient i takes the gain of
    token floor(i * 6 / 4) = 0, 1, 3, 4."""
    band = torch.ones(1, 1, 4, 1, dtype=torch.float64)
    gains = torch.arange(6, dtype=torch.float64)[None, :, None].expand(1, 6, 2) * 10
    scaled = wersa_oracle.scale_band(band, gains, 0, 6)
    assert scaled.flatten().tolist() == [0.0, 10.0, 30.0, 40.0]


def test_gelu_is_x_times_the_normal_cdf():
    x = torch.linspace(-4, 4, 17, dtype=torch.float64)
    cdf = torch.tensor([0.5 * math.erfc(-t / math.sqrt(2)) for t in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(wersa_oracle.gelu(x), x * cdf, rtol=1e-12, atol=1e-14)


def test_s2_pattern_with_vertical_stride_one_is_causal_attention():
    pattern = s2_oracle.s2_pattern(80, 80, 4, 2, block_size=16, local_blocks=1, vert_stride=1, causal=True)
    assert torch.equal(pattern, torch.ones(1, 4, 5, 5, dtype=torch.bool).tril())


def test_diagonal_blocks_by_hand():
    """N = 32 queries, M = 64 keys, blocks of 16: query i's diagonal key is i + 32."""
    assert torch.equal(last_query_diagonal_blocks(32, 64, 16, 16), picture("..#.\n...#"))
    assert torch.equal(every_query_diagonal_blocks(32, 64, 16, 16, causal=True), picture("..#.\n...#"))
    # N = 40 > M = 20: queries 0..19 see no key; blocks of 16 hold query diagonals 0..3 / 4..19
    assert torch.equal(every_query_diagonal_blocks(40, 20, 16, 16, causal=True), picture("..\n#.\n##"))
    assert torch.equal(every_query_diagonal_blocks(40, 20, 16, 16, causal=False), picture("#.\n#.\n##"))
    assert torch.equal(last_query_diagonal_blocks(40, 20, 16, 16), picture("..\n#.\n.#"))


def test_xattention_oracle_threshold_zero_keeps_only_key_block_zero_and_the_diagonal():
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(1, 1, 64, 16, generator=gen), torch.randn(1, 1, 64, 16, generator=gen)
    keep = xattention_oracle.select_blocks(q, k, stride=4, threshold=0.0, block_q=16, block_k=16, scale=0.25,
                                           causal=True)
    assert torch.equal(keep[0, 0], picture("#...\n##..\n#.#.\n#..#"))
    estimate = xattention_oracle.antidiagonal_estimate(q, k, stride=4, block_q=16, block_k=16, scale=0.25,
                                                       causal=False)
    torch.testing.assert_close(estimate.sum(-1), torch.full((1, 1, 4), 4.0, dtype=torch.float64))  # 16 / 4 groups


def test_alibi_oracle_by_hand():
    """Slope 0.5, N = 2 queries at key positions 1 and 2 of M = 3: bias -0.5 * (i + 1 - j)."""
    bias = reference.flashbias.alibi_bias(torch.tensor([0.5]), 2, 3)
    assert bias[0, 0].tolist() == [[-0.5, 0.0, 0.5], [-1.0, -0.5, 0.0]]
