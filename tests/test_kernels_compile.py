"""The flash kernels (with their span / listed / tile helpers) and the block-target kernel compile
for real GPUs (sm_80, sm_90) in every variant the launchers use. (One child process per test compiles
them; see cuda_compile.py for why.)"""

from attnzoo.kernels import flash
from attnzoo.kernels._config import prune_for_sparse
from cuda_compile import compile_in_subprocess

SPARSE_POINTERS = ("COUNT_FULL", "INDEX_FULL", "COUNT_PART", "INDEX_PART")
TENSORS = {
    "_flash_fwd_kernel": ("Q", "K", "V", "O", "LSE"),
    "_flash_dq_kernel": ("Q", "K", "V", "DO", "DQ", "LSE", "DELTA"),
    "_flash_dkdv_kernel": ("Q", "K", "V", "DO", "DK", "DV_OUT", "LSE", "DELTA"),
}
VARIANTS = [  # together they cover every constexpr branch: each kernel dense (span helpers) and sparse
    # (listed helpers), masks, softcap, each dtype, both archs, batches and packs (VARLEN)
    # kernel, dtype, sparse, causal, window, softcap, tiles (m, n), head dim, arch[, TMA[, bias[, pack]]]
    ("_flash_fwd_kernel", "*bf16", False, True, False, False, (128, 64), 128, 90),
    ("_flash_fwd_kernel", "*fp32", True, False, True, True, (32, 32), 64, 80),
    ("_flash_fwd_kernel", "*bf16", True, True, True, True, (64, 64), 64, 90, True),  # TMA, sparse
    ("_flash_fwd_kernel", "*fp16", False, False, False, False, (128, 64), 128, 90, True),  # TMA, dense
    ("_flash_dq_kernel", "*fp16", True, True, False, False, (64, 64), 64, 90),
    ("_flash_dq_kernel", "*bf16", False, False, True, True, (64, 32), 64, 80),
    ("_flash_dkdv_kernel", "*bf16", False, False, True, True, (32, 64), 64, 80),
    ("_flash_dkdv_kernel", "*fp16", True, True, False, False, (64, 128), 128, 90),
    ("_flash_fwd_kernel", "*bf16", True, True, False, True, (64, 64), 64, 90, False, True),  # bias
    ("_flash_dq_kernel", "*fp16", False, True, False, False, (64, 64), 64, 80, False, True),  # bias + its grad
    ("_flash_dkdv_kernel", "*bf16", False, False, True, False, (64, 64), 128, 90, False, True),  # bias
    ("_flash_fwd_kernel", "*bf16", True, True, False, False, (128, 64), 128, 90, True, False, True),  # pack, TMA
    ("_flash_dkdv_kernel", "*bf16", True, True, False, True, (64, 128), 128, 90, False, False, True),  # pack
]
PACK_POINTERS = ("TILES", "TILE_BASE", "CU_Q", "CU_K")


def _job(kernel, dtype, sparse, causal, window, softcap, tiles, head_dim, arch, tma=False, bias=False, pack=False):
    pointers = {name: {"LSE": "*fp32", "DELTA": "*fp32"}.get(name, dtype) for name in TENSORS[kernel]}
    pointers.update({name: ("*i32" if sparse else None) for name in SPARSE_POINTERS})
    pointers.update({name: ("*i32" if pack else None) for name in PACK_POINTERS})
    bias_grad = bias and kernel == "_flash_dq_kernel"
    pointers.update(BIAS="*fp32" if bias else None, DBIAS="*fp32" if bias_grad else None)
    meta = dict(HAS_LEFT=window, HAS_RIGHT=causal or window, HAS_SOFTCAP=softcap, HAS_BIAS=bias, BIAS_GRAD=bias_grad,
                VARLEN=pack,
                SPARSE_Q=128 if sparse else 0, SPARSE_K=128 if sparse else 0, BLOCK_M=tiles[0], BLOCK_N=tiles[1],
                BLOCK_D=head_dim, BLOCK_DV=head_dim, PRECISION="ieee" if dtype == "*fp32" else "tf32")
    if kernel == "_flash_fwd_kernel":
        meta["TMA"] = tma
    return dict(kernel=f"attnzoo.kernels.flash:{kernel}", pointers=pointers, floats=["scale", "softcap"],
                constexprs=meta, arch=arch, num_warps=4)


def _compile_all(jobs):
    result = compile_in_subprocess(jobs)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("ok ") == len(jobs), result.stdout


def test_flash_kernels_compile_for_sm80_and_sm90():
    jobs = [_job(*variant) for variant in VARIANTS]
    jobs.append(dict(kernel="attnzoo.kernels.flash:_delta_kernel",
                     pointers={"O": "*bf16", "DO": "*bf16", "DELTA": "*fp32"},
                     constexprs=dict(BLOCK_M=64, BLOCK_DV=128)))
    _compile_all(jobs)


def test_block_target_kernel_compiles_for_sm80_and_sm90():
    _compile_all([dict(kernel="attnzoo.kernels.block_target:_block_target_kernel",
                       pointers={"Q": dtype, "K": dtype, "LSE": "*fp32", "OUT": "*fp32",
                                 **{name: "*i32" if pack else None for name in PACK_POINTERS}}, floats=["scale"],
                       constexprs=dict(CAUSAL=causal, VARLEN=pack, BLOCK=128, BLOCK_M=64, BLOCK_N=64, BLOCK_D=64,
                                       PRECISION="ieee" if dtype == "*fp32" else "tf32"),
                       arch=arch, num_warps=4)
                  for dtype, causal, arch, pack in [("*bf16", True, 90, False), ("*fp32", False, 80, True)]])


def test_every_autotune_config_set_divides_into_sparse_blocks():
    for tuned in (flash._flash_fwd_tuned, flash._flash_dq_tuned, flash._flash_dkdv_tuned):
        for sparse_q, sparse_k in [(16, 16), (32, 64), (128, 128), (64, 256)]:
            kept = prune_for_sparse(tuned.configs, {}, SPARSE_Q=sparse_q, SPARSE_K=sparse_k)
            assert kept, (sparse_q, sparse_k)
            assert all(sparse_q % c.kwargs["BLOCK_M"] == 0 and sparse_k % c.kwargs["BLOCK_N"] == 0 for c in kept)
        assert prune_for_sparse(tuned.configs, {}, SPARSE_Q=0, SPARSE_K=0) == tuned.configs


# The TMA forward (tensor descriptors for q / k / v; chosen on sm_90) under the interpreter, which
# runs descriptors too: bit-identical to the pointer forward on ragged shapes, windows, GQA and a
# block-sparse index (the descriptor zero-fills outside the head as the masked loads do).
import pytest  # noqa: E402
import torch  # noqa: E402

import attnzoo  # noqa: E402
from attnzoo import masks  # noqa: E402


def _both_ways(monkeypatch, fn):
    monkeypatch.setenv("ATTNZOO_FLASH_TMA", "0")
    plain = fn()
    monkeypatch.setenv("ATTNZOO_FLASH_TMA", "1")
    return plain, fn()


@pytest.mark.parametrize("shape, window", [((37, 53, 16), (-1, -1)), ((40, 24, 32), (-1, 0)), ((64, 64, 16), (5, 3))])
def test_tma_forward_matches_the_pointer_forward(monkeypatch, shape, window):
    N, M, D = shape
    gen = torch.Generator().manual_seed(N)
    q = torch.randn(1, 2, N, D, generator=gen).half()
    k, v = (torch.randn(1, 1, M, D, generator=gen).half() for _ in range(2))
    assert flash._tma_ready(q, k, v) and not flash._tma_ready(q.float(), k, v) and not flash._tma_ready(q[..., 1:], k, v)
    (o0, l0), (o1, l1) = _both_ways(monkeypatch, lambda: flash.flash_fwd(q, k, v, scale=0.3, window=window))
    assert torch.equal(o0, o1) and torch.equal(l0, l1)


def test_tma_forward_matches_on_a_block_sparse_index(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 64, 16, generator=gen).half() for _ in range(3))
    mask = masks.random(64, 64, 0.5, 16, heads=2, causal=True)
    run = attnzoo.get("block_sparse")
    o0, o1 = _both_ways(monkeypatch, lambda: run(q, k, v, causal=True, block_mask=mask, backend="triton"))
    assert torch.equal(o0, o1)


def test_tma_forward_matches_on_a_pack(monkeypatch):
    """The descriptors of a pack's program start at its sequence's first row and end at its last."""
    gen = torch.Generator().manual_seed(2)
    q_starts, k_starts = [0, 21, 21, 60], [0, 9, 30, 47]
    q = torch.randn(1, 2, q_starts[-1], 16, generator=gen).half()
    k, v = (torch.randn(1, 1, k_starts[-1], 16, generator=gen).half() for _ in range(2))
    (o0, l0), (o1, l1) = _both_ways(monkeypatch, lambda: flash.flash_fwd(q, k, v, scale=0.3, window=(-1, 0),
                                                                         seqlens=(q_starts, k_starts)))
    assert torch.equal(o0, o1) and torch.equal(l0, l1)
