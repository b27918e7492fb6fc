"""Context parallelism (attnzoo.distributed) on CPU with gloo: world sizes 2 and 4.

One spawn per world size runs every case of CASES in its process group (torch.multiprocessing,
MASTER_ADDR=127.0.0.1 and a free port) and saves each rank's local outputs and gradients; the test
process then reassembles the shards with its own chunk arithmetic and compares them with the
single-process call on the same inputs (fp32, relative RMS <= 1e-6), and once with a float64
softmax written here. Error cases (uneven lengths, chunks off block boundaries) record their message.
"""

from __future__ import annotations

import datetime
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import attnzoo
from attnzoo.methods.seerattention import AttnGate

WORLD_SIZES = (2, 4)
N = 128  # every global length is a multiple of 2 x 4 x 16: zigzag chunks of 16 tokens at world size 4
TOLERANCE = 1e-6


class Case(NamedTuple):
    method: str
    causal: bool
    zigzag: bool = True
    params: dict = {}
    heads: tuple[int, int] = (4, 2)  # (Hq, Hk)
    lengths: tuple[int, int] = (N, N)  # (N, M)
    extra: str | None = None  # name of the builder of the method's extra inputs
    flags: dict = {}  # optional outputs asked for
    backend: str = "torch"  # "triton": the kernels under the Triton interpreter (slow: world size 2 only)
    worlds: tuple[int, ...] = WORLD_SIZES


def _random_mask(q, k, causal):
    return attnzoo.masks.random(q.shape[2], k.shape[2], 0.5, 16, heads=q.shape[1], seed=3, causal=causal)


def _seer_gate(q, k, causal):
    torch.manual_seed(5)
    return AttnGate(16, q.shape[1], k.shape[1], hidden=16, block_size=16)


def _block_scores(q, k, causal):
    return torch.rand(1, q.shape[1], q.shape[2] // 16, k.shape[2] // 16, generator=torch.Generator().manual_seed(4))


# extra inputs: builder(q, k, causal, generator) -> {name: value}; SHARDED names the per-token ones
# (and their sequence dim); TRAINABLE the ones that get gradients.
EXTRAS = {
    "block_mask": lambda q, k, causal, gen: {"block_mask": _random_mask(q, k, causal)},
    "seer_gate": lambda q, k, causal, gen: {"gate": _seer_gate(q, k, causal)},
    "seer_scores": lambda q, k, causal, gen: {"gate": _block_scores(q, k, causal)},
    "bias_factors": lambda q, k, causal, gen: {"bias_factors": (
        torch.randn(1, q.shape[1], q.shape[2], 8, generator=gen) / 3,
        torch.randn(1, 1, k.shape[2], 8, generator=gen) / 3)},
    # slopes <= 1/16: biases up to 8 over 128 keys, logits of order 1 (fp32 rounds larger ones at 1e-6)
    "alibi": lambda q, k, causal, gen: {"alibi_slopes": torch.rand(q.shape[1], generator=gen) / 16},
    "gla_gates": lambda q, k, causal, gen: {
        "g": F.logsigmoid(torch.randn(q.shape, generator=gen)) / 4,
        "initial_state": torch.randn(*q.shape[:2], q.shape[-1], q.shape[-1], generator=gen) / 4},
    "lawcat_head_gates": lambda q, k, causal, gen: {
        "g": F.logsigmoid(torch.randn(q.shape[:3], generator=gen) + 2),
        "conv_q": torch.randn(q.shape[1], q.shape[-1], 4, generator=gen) / 2,
        "conv_k": torch.randn(q.shape[1], q.shape[-1], 4, generator=gen) / 2},
    "lawcat_channel_gates": lambda q, k, causal, gen: {
        "g": F.logsigmoid(torch.randn(q.shape, generator=gen) + 2),
        "conv_k": torch.randn(q.shape[1], q.shape[-1], 3, generator=gen) / 2},
    "wersa_gains": lambda q, k, causal, gen: {"gains": torch.rand(3, generator=gen) + 0.5},
    "wersa_series": lambda q, k, causal, gen: {"gains": torch.rand(q.shape[0], q.shape[2], 3, generator=gen) + 0.5},
}
SHARDED = {"g": 2, "bias_factors": 2, "gains": 1}  # gains only as a series (B, N, L+1), not a vector (L+1,)


def _sharded(name: str, value) -> bool:
    return name in SHARDED and not (name == "gains" and value.dim() == 1)
TRAINABLE = ("bias_factors", "g", "conv_q", "conv_k", "initial_state")

XATTN = {"block_size": 16, "stride": 4, "threshold": 0.5}
CASES = [
    Case("dense", True, flags={"return_lse": True}),
    Case("dense", False, zigzag=False, params={"softcap": 5.0}),
    Case("dense", True, lengths=(64, N)),
    Case("dense", False, heads=(2, 2), lengths=(64, N)),
    Case("block_sparse", True, params={"block_size": 16, "softcap": 5.0}, extra="block_mask",
         flags={"return_block_mask": True}),
    Case("block_sparse", False, zigzag=False, params={"block_size": 16}, extra="block_mask"),
    Case("block_sparse", True, params={"block_size": 16}, heads=(2, 1), lengths=(64, 64), extra="block_mask",
         backend="triton", worlds=(2,)),
    Case("xattention", True, params=XATTN, flags={"return_block_mask": True}),
    Case("xattention", False, zigzag=False, params=XATTN),
    Case("xattention", False, params={**XATTN, "selection": "official"}, flags={"return_block_mask": True}),
    Case("seerattention", True, params={"block_size": 16, "topk_ratio": 0.4, "last_blocks_dense": 1},
         flags={"return_block_mask": True}),
    Case("seerattention", True, zigzag=False, params={"block_size": 16, "topk_ratio": 0.5}, extra="seer_gate"),
    Case("seerattention", False, params={"block_size": 16, "threshold": 0.5, "last_blocks_dense": 0},
         extra="seer_scores"),
    Case("s2", True, params={"block_size": 16, "local_blocks": 2, "vert_stride": 2}, flags={"return_block_mask": True}),
    Case("s2", False, zigzag=False, params={"block_size": 16, "local_blocks": 1, "vert_stride": 3}),
    Case("sparsed", False, params={"block_size": 16, "select": 0.3, "gen_len": 32}, flags={"return_block_mask": True}),
    Case("sparsed", False, zigzag=False, params={"block_size": 16, "select": 0.5}),
    Case("flashbias", True, extra="bias_factors"),
    Case("flashbias", False, zigzag=False, extra="bias_factors"),
    Case("flashbias", True, extra="alibi"),
    Case("gla", True, heads=(2, 2), extra="gla_gates", flags={"output_final_state": True}),
    Case("gla", True, zigzag=False, heads=(2, 2)),
    Case("based", True, heads=(2, 2)),
    Case("based", False, zigzag=False, heads=(2, 2), params={"use_norm": False}),
    Case("lawcat", True, heads=(2, 2), extra="lawcat_head_gates"),
    Case("lawcat", True, zigzag=False, heads=(2, 2), extra="lawcat_channel_gates"),
    Case("wersa", False, heads=(2, 2), params={"num_features": 32}, extra="wersa_gains"),
    Case("wersa", False, zigzag=False, heads=(2, 2), params={"num_features": 32}, extra="wersa_series"),
]


class Inputs(NamedTuple):
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    extra: dict
    upstream: torch.Tensor  # gradient of the loss w.r.t. the output
    upstream_lse: torch.Tensor
    upstream_state: torch.Tensor


def build(case: Case, seed: int) -> Inputs:
    """The global inputs of a case: the same tensors in every process."""
    gen = torch.Generator().manual_seed(seed)
    (hq, hk), (n, m) = case.heads, case.lengths
    q = torch.randn(1, hq, n, 16, generator=gen)
    k = torch.randn(1, hk, m, 16, generator=gen)
    v = torch.randn(1, hk, m, 16, generator=gen)
    extra = EXTRAS[case.extra](q, k, case.causal, gen) if case.extra else {}
    return Inputs(q, k, v, extra, torch.randn(1, hq, n, 16, generator=gen), torch.randn(1, hq, n, generator=gen),
                  torch.randn(1, hq, 16, 16, generator=gen))


def _map(fn, value):
    return tuple(fn(x) for x in value) if isinstance(value, tuple) else fn(value)


def _leaf(x):
    return x.detach().clone().requires_grad_()


def _grads(value):
    return _map(lambda x: x.grad, value)


def _split_result(result, flags):
    """out and the optional outputs by flag name."""
    if not flags:
        return result, {}
    out, optional = result
    return out, {next(iter(flags)): optional}


def _loss(out, optional, inputs: Inputs, shard, with_state: bool):
    loss = (out * shard(inputs.upstream)).sum()
    if "return_lse" in optional:
        loss = loss + (optional["return_lse"] * shard(inputs.upstream_lse)).sum()
    if "output_final_state" in optional and with_state:
        loss = loss + (optional["output_final_state"] * inputs.upstream_state).sum()
    return loss


def _saved(out, optional, tensors: dict):
    saved = {"out": out.detach(), "grads": {name: _grads(t) for name, t in tensors.items()}}
    if "return_lse" in optional:
        saved["lse"] = optional["return_lse"].detach()
    if "return_block_mask" in optional:
        saved["mask"] = optional["return_block_mask"].mask
    if "output_final_state" in optional:
        saved["state"] = optional["output_final_state"].detach()
    return saved


def run_single(case: Case, seed: int) -> dict:
    """The single-process call: the oracle."""
    inputs = build(case, seed)
    tensors = {"q": _leaf(inputs.q), "k": _leaf(inputs.k), "v": _leaf(inputs.v)}
    extra = dict(inputs.extra)
    for name in set(extra) & set(TRAINABLE):
        extra[name] = tensors[name] = _map(_leaf, extra[name])
    method = attnzoo.get(case.method, **case.params)
    result = method(tensors["q"], tensors["k"], tensors["v"], causal=case.causal, backend=case.backend, **extra,
                    **case.flags)
    out, optional = _split_result(result, case.flags)
    _loss(out, optional, inputs, lambda x: x, True).backward()
    return _saved(out, optional, tensors)


def run_sharded(case: Case, seed: int) -> dict:
    """This rank's part of the context-parallel call (inside a process group)."""
    from attnzoo.distributed import context_parallel, shard_sequence

    inputs = build(case, seed)

    def shard(x, dim=2):
        return shard_sequence(x, zigzag=case.zigzag, dim=dim)

    tensors = {name: _leaf(shard(x)) for name, x in (("q", inputs.q), ("k", inputs.k), ("v", inputs.v))}
    extra = {}
    for name, value in inputs.extra.items():
        if _sharded(name, value):
            value = _map(lambda x: shard(x, SHARDED[name]), value)
        extra[name] = value
        if name in TRAINABLE:
            extra[name] = tensors[name] = _map(_leaf, value)
    method = context_parallel(case.method, zigzag=case.zigzag, **case.params)
    result = method(tensors["q"], tensors["k"], tensors["v"], causal=case.causal, backend=case.backend, **extra,
                    **case.flags)
    out, optional = _split_result(result, case.flags)
    _loss(out, optional, inputs, shard, dist.get_rank() == 0).backward()
    return _saved(out, optional, tensors)


def _error_of(call) -> str:
    try:
        call()
    except ValueError as error:
        return str(error)
    return "no error"


def run_errors() -> dict:
    """Messages of the calls context parallelism refuses."""
    from attnzoo.distributed import context_parallel, shard_sequence

    world = dist.get_world_size()
    x = torch.randn(1, 2, 99, 16)
    local = torch.randn(1, 4, N // world, 16)  # N over 2 x world zigzag chunks of 16 / 32 tokens
    xattention = context_parallel("xattention", block_size=64, stride=8, threshold=0.5)
    return {
        "uneven": _error_of(lambda: shard_sequence(x, zigzag=False)),
        "off_blocks": _error_of(lambda: xattention(local, local, local, causal=True, backend="torch")),
        "odd_shard": _error_of(lambda: context_parallel("dense")(x[:, :, :7], x[:, :, :7], x[:, :, :7])),
        "window": _error_of(lambda: context_parallel("dense", window_size=(8, 0))(local, local, local, causal=True)),
    }


def run_gather_roundtrip() -> dict:
    """gather_sequence(shard_sequence(x)) == x, and the gradient of a loss every rank computes on the
    gathered tensor reaches each shard summed over the ranks."""
    from attnzoo.distributed import gather_sequence, shard_sequence

    x = torch.randn(2, 3, N, 5, generator=torch.Generator().manual_seed(9))
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(10))
    local = _leaf(shard_sequence(x, zigzag=True))
    full = gather_sequence(local, zigzag=True)
    (full * weight).sum().backward()
    return {"full": full.detach(), "grad": local.grad, "weight_shard": shard_sequence(weight, zigzag=True)}


SCHEDULE = {"block_size": 16, "select": 0.3, "skip": 0.25, "total_steps": 4}  # pattern made at step 2


def sparsed_schedule(method_of, shard) -> torch.Tensor:
    """SparseD's schedule: step 2 makes the pattern from its q, k (and runs dense), step 3 reuses it on
    other inputs. Returns step 3's output."""
    cache = {}
    case = Case("sparsed", False)
    for step in (2, 3):
        q, k, v = (shard(x) for x in build(case, 100 + step)[:3])
        out = method_of("sparsed", **SCHEDULE)(q, k, v, causal=False, backend="torch", step=step, cache=cache)
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from attnzoo.distributed import context_parallel, shard_sequence

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        results = {"cases": [run_sharded(case, seed) if world in case.worlds else None
                             for seed, case in enumerate(CASES)],
                   "errors": run_errors(), "gather": run_gather_roundtrip(),
                   "schedule": sparsed_schedule(context_parallel, shard_sequence)}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    """{world: [rank results]} from one spawned process group per world size."""
    runs = {}
    for world in WORLD_SIZES:
        out_dir = tmp_path_factory.mktemp(f"world{world}")
        mp.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=True)
        runs[world] = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return runs


@pytest.fixture(scope="module")
def single_runs():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield [run_single(case, seed) for seed, case in enumerate(CASES)]
    torch.set_num_threads(threads)


def unshard(shards: list[torch.Tensor], zigzag: bool, dim: int = 2) -> torch.Tensor:
    """The full tensor from the ranks' shards (rank r: chunk r, or chunks r and 2W - 1 - r)."""
    world = len(shards)
    if not zigzag:
        return torch.cat(shards, dim=dim)
    chunks = [None] * (2 * world)
    for rank, local in enumerate(shards):
        chunks[rank], chunks[2 * world - 1 - rank] = local.chunk(2, dim=dim)
    return torch.cat(chunks, dim=dim)


def rel_rms(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).pow(2).mean().sqrt() / want.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def _assert_close(name, got, want, tolerance=TOLERANCE):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    error = rel_rms(got, want)
    assert error <= tolerance, f"{name}: relative RMS error {error:.2e} > {tolerance:.0e}"


def _gathered_grad(name: str, shards: list, case: Case):
    """A gradient as the single process sees it: shards reassembled, unsharded inputs summed over ranks."""
    if name in ("q", "k", "v") or name in SHARDED:
        dim = SHARDED.get(name, 2)
        if isinstance(shards[0], tuple):
            return tuple(unshard(list(parts), case.zigzag, dim) for parts in zip(*shards))
        return unshard(shards, case.zigzag, dim)
    return torch.stack(shards).sum(0)


def _case_id(item):
    index, case = item
    layout = "zigzag" if case.zigzag else "contig"
    return f"{index}-{case.method}-{'causal' if case.causal else 'noncausal'}-{layout}-{case.backend}"


@pytest.mark.parametrize("world", WORLD_SIZES)
@pytest.mark.parametrize("index_case", list(enumerate(CASES)), ids=_case_id)
def test_context_parallel_equals_single_process(distributed_runs, single_runs, world, index_case):
    index, case = index_case
    if world not in case.worlds:
        pytest.skip(f"run at world sizes {case.worlds} only")
    ranks = [r["cases"][index] for r in distributed_runs[world]]
    want = single_runs[index]
    _assert_close("out", unshard([r["out"] for r in ranks], case.zigzag), want["out"])
    for name, grad in want["grads"].items():
        got = _gathered_grad(name, [r["grads"][name] for r in ranks], case)
        for part, (g, w) in enumerate(zip(*(x if isinstance(x, tuple) else (x,) for x in (got, grad)))):
            _assert_close(f"d{name}[{part}]", g, w)
    if "lse" in want:
        _assert_close("lse", unshard([r["lse"] for r in ranks], case.zigzag), want["lse"])
    if "mask" in want:
        for r in ranks:
            assert torch.equal(r["mask"], want["mask"]), "the global block mask differs from the single-process one"
    if "state" in want:
        for r in ranks:
            _assert_close("final state", r["state"], want["state"])


def test_sparse_cases_select_blocks_that_skip_work(single_runs):
    """The sparse cases really drop blocks, so the ring's skipping is exercised."""
    for index, case in enumerate(CASES):
        if "mask" in single_runs[index]:
            assert single_runs[index]["mask"].float().mean() < 0.9, case


def _float64_attention(q, k, v, causal: bool) -> torch.Tensor:
    """softmax(q k^T / sqrt(D)) v in float64, GQA by repeating kv heads, causal bottom-right aligned."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        n, m = q.shape[2], k.shape[2]
        visible = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
        scores = scores.masked_fill(~visible, -math.inf)
    return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_dense_matches_a_float64_softmax(distributed_runs, world):
    for index, case in enumerate(CASES):
        if case.method != "dense" or case.params:
            continue
        inputs = build(case, index)
        got = unshard([r["cases"][index]["out"] for r in distributed_runs[world]], case.zigzag)
        _assert_close(f"case {index}", got, _float64_attention(inputs.q, inputs.k, inputs.v, case.causal), 1e-5)


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_uneven_lengths_and_unsupported_parameters_are_refused(distributed_runs, world):
    errors = distributed_runs[world][0]["errors"]
    assert "99" in errors["uneven"] and f"world size {world}" in errors["uneven"], errors["uneven"]
    assert "128" in errors["off_blocks"] and f"world size {world}" in errors["off_blocks"], errors["off_blocks"]
    assert "block size 64" in errors["off_blocks"], errors["off_blocks"]
    assert f"{7 * world}" in errors["odd_shard"] and f"world size {world}" in errors["odd_shard"], errors["odd_shard"]
    assert "window_size" in errors["window"] and "default" in errors["window"], errors["window"]


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_gather_sequence_inverts_shard_sequence(distributed_runs, world):
    x = torch.randn(2, 3, N, 5, generator=torch.Generator().manual_seed(9))
    for result in distributed_runs[world]:
        gathered = result["gather"]
        assert torch.equal(gathered["full"], x)
        assert torch.allclose(gathered["grad"], world * gathered["weight_shard"])


def _plan(n, m, world, zigzag, causal, block_mask=None):
    """plan_pair over every (query chunk, key chunk), on a layout that needs no process group."""
    from attnzoo.distributed.layout import Layout
    from attnzoo.distributed.ring import RingSpec, plan_pair

    layout = Layout(None, world, 0, zigzag)
    spec = RingSpec(layout, "torch", n, m, causal, 1.0, 0.0, block_mask)
    chunks = layout.num_chunks
    return {(a, b): plan_pair(spec, a, 0, b, 0) for a in range(chunks) for b in range(chunks)}


@pytest.mark.parametrize("n, m", [(64, 64), (32, 64), (64, 48)])
def test_a_pair_sees_exactly_the_keys_the_global_causal_rule_allows(n, m):
    """Truncated keys plus the window (-1, right), read in the pair's own bottom-right alignment, give
    the global rule key <= query + M - N; pairs with no visible key are skipped."""
    cq, ck = n // 8, m // 8  # world size 4, zigzag: 8 chunks
    for (a, b), pair in _plan(n, m, 4, True, True).items():
        rows, cols = torch.arange(cq)[:, None] + a * cq, torch.arange(ck)[None, :] + b * ck
        want = cols <= rows + (m - n)
        if pair is None:
            assert not want.any(), (a, b)
            continue
        keys = pair.k_rows.stop
        local_j, local_i = torch.arange(ck)[None, :], torch.arange(cq)[:, None]
        got = (local_j < keys) & (local_j - local_i - (keys - cq) <= pair.window[1])
        assert pair.window[1] >= 0 and torch.equal(got, want), (a, b)


def test_pairs_whose_blocks_are_all_unselected_are_skipped():
    keep = torch.zeros(8, 8, dtype=torch.bool)
    keep[5, 2] = keep[0, 0] = True  # query block 5 (chunk 2 of 4) reads key block 2 (chunk 1)
    plans = _plan(128, 128, 4, False, False, attnzoo.BlockMask(keep, 16))  # 4 chunks of 2 blocks
    computed = {pair for pair, plan in plans.items() if plan is not None}
    assert computed == {(0, 0), (2, 1)}
    assert torch.equal(plans[(2, 1)].block_mask.mask[0, 0], keep[4:6, 2:4])


def test_the_torchrun_example_runs():
    """docs/distributed.md's example, as its users run it: torchrun --nproc-per-node 2 on CPU."""
    root = Path(__file__).resolve().parent.parent
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), str(root / "examples" / "cp_torchrun.py"), "--length", "256"]
    # as a user runs it: the test harness's interpreter switch would make it run the Triton interpreter
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env, cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "world size 2" in result.stdout and "relative error vs one device" in result.stdout, result.stdout


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_sparsed_schedule_reuses_the_global_pattern(distributed_runs, world):
    want = sparsed_schedule(attnzoo.get, lambda x: x)
    _assert_close("step 3", unshard([r["schedule"] for r in distributed_runs[world]], True), want)
