"""The linear-attention kernels compile for real GPUs (sm_80, sm_90) in the variants the launchers
use on CUDA: gated (BT 16, BK 32) and ungated (BT 64, BK 64) tiles, causal and non-causal, with and
without initial / final states, fp32 and 16-bit inputs. (One child process; see cuda_compile.py.)"""

from cuda_compile import compile_in_subprocess

INPUTS = ("q", "k", "v", "g", "dout")
FP32_BUFFERS = ("h0", "chunk_states", "final_state", "states", "out", "dfinal", "dstates", "dh0", "dq", "dk", "dv")
KERNEL_ARGS = {
    "_states_fwd": ("k", "v", "g", "h0", "chunk_states", "final_state"),
    "_output_fwd": ("q", "k", "v", "g", "states", "out"),
    "_states_bwd": ("q", "g", "dout", "dfinal", "dstates", "dh0"),
    "_dqk_bwd": ("q", "k", "v", "g", "states", "dstates", "dout", "dq", "dk"),
    "_dv_bwd": ("q", "k", "g", "dstates", "dout", "dv"),
}
SWITCHES = {  # constexprs each kernel takes besides the tiles
    "_states_fwd": ("HAS_INITIAL", "STORE_CHUNKS"),
    "_output_fwd": ("CAUSAL",),
    "_states_bwd": ("HAS_DFINAL", "STORE_CHUNKS"),
    "_dqk_bwd": ("CAUSAL",),
    "_dv_bwd": ("CAUSAL",),
}
PACK_ARGS = {"_states_fwd": ("CU", "CHUNK_STARTS"), "_states_bwd": ("CU", "CHUNK_STARTS")}  # others: + CHUNKS
VARIANTS = [  # dtype, gated, causal, with states, arch, pack, kernels: together every constexpr branch
    ("*bf16", True, True, True, 90, False, tuple(KERNEL_ARGS)),
    ("*fp32", False, False, False, 80, False, tuple(KERNEL_ARGS)),
    ("*fp16", False, True, True, 90, False, ("_output_fwd", "_dqk_bwd", "_dv_bwd")),  # the ungated causal tl.dot path
    ("*bf16", True, True, True, 90, True, tuple(KERNEL_ARGS)),  # a pack (cu_seqlens)
    ("*fp16", False, False, False, 80, True, tuple(KERNEL_ARGS)),
]


def _job(kernel, dtype, gated, causal, with_states, arch, pack):
    pointers = {name: ("*i32" if pack else None) for name in PACK_ARGS.get(kernel, ("CU", "CHUNK_STARTS", "CHUNKS"))}
    for name in KERNEL_ARGS[kernel]:
        optional = (name == "g" and not gated) or (name in ("h0", "dfinal") and not with_states) \
            or (name in ("chunk_states", "dstates") and kernel in ("_states_fwd", "_states_bwd") and not causal)
        pointers[name] = None if optional else (dtype if name in INPUTS else "*fp32")
    flags = {"HAS_INITIAL": with_states, "HAS_DFINAL": with_states, "STORE_CHUNKS": causal, "CAUSAL": causal}
    tiles = dict(BT=16, BK=32, BV=64) if gated else dict(BT=64, BK=64, BV=64)
    constexprs = dict(tiles, GATED=gated, VARLEN=pack, PRECISION="ieee" if dtype == "*fp32" else "native",
                      **{name: flags[name] for name in SWITCHES[kernel]})
    return dict(kernel=f"attnzoo.kernels.linear:{kernel}", pointers=pointers, floats=["scale"],
                constexprs=constexprs, arch=arch, num_warps=4)


def test_linear_kernels_compile_for_sm80_and_sm90():
    jobs = [_job(kernel, *variant[:-1]) for variant in VARIANTS for kernel in variant[-1]]
    result = compile_in_subprocess(jobs)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("ok ") == len(jobs), result.stdout


# The "native" products (16-bit operands into tl.dot, fp32 accumulation; what CUDA runs for bf16 /
# fp16 inputs) checked under the interpreter with fp16 inputs (its bf16 tl.dot is wrong, its fp16 one
# is not), forward and backward, against float64 on the same rounded inputs: the existing fp16
# tolerance of tests/test_linear_kernel.py.
import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attnzoo.ops.linear import linear_attention  # noqa: E402
from attnzoo.reference import recurrent_linear_attention  # noqa: E402


def _rms(got, want):
    return ((got.double() - want).square().mean() / want.square().mean()).sqrt().item()


@pytest.mark.parametrize("gated, causal", [(True, True), (False, True), (False, False)])
def test_native_half_products_stay_within_the_fp16_tolerance(monkeypatch, gated, causal):
    monkeypatch.setenv("ATTNZOO_LINEAR_DOT", "native")
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 29, 16, generator=gen) for _ in range(3))
    inputs = {"q": q, "k": k, "v": v}
    if gated:
        inputs["g"] = F.logsigmoid(torch.randn(1, 2, 29, 16, generator=gen) + 1.0)
    half = {name: x.half().requires_grad_() for name, x in inputs.items()}
    wide = {name: x.detach().double().requires_grad_() for name, x in half.items()}
    out = linear_attention(**half, scale=0.25, causal=causal, backend="triton", chunk_size=16)
    if causal:
        want, _, _ = recurrent_linear_attention(**wide, scale=0.25)
    else:
        want = linear_attention(**wide, scale=0.25, causal=False, backend="torch", chunk_size=16)
    assert out.dtype == torch.float16
    assert _rms(out, want) < 2e-3
    do = torch.randn(out.shape, generator=gen)
    out.float().backward(do.half().float())
    want.backward(do.half().double())
    for name in half:
        assert _rms(half[name].grad, wide[name].grad) < 1e-2, name
