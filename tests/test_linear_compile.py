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
VARIANTS = [  # dtype, gated, causal, with states, arch, kernels: together every constexpr branch
    ("*bf16", True, True, True, 90, tuple(KERNEL_ARGS)),
    ("*fp32", False, False, False, 80, tuple(KERNEL_ARGS)),
    ("*fp16", False, True, True, 90, ("_output_fwd", "_dqk_bwd", "_dv_bwd")),  # the ungated causal tl.dot path
]


def _job(kernel, dtype, gated, causal, with_states, arch):
    pointers = {}
    for name in KERNEL_ARGS[kernel]:
        optional = (name == "g" and not gated) or (name in ("h0", "dfinal") and not with_states) \
            or (name in ("chunk_states", "dstates") and kernel in ("_states_fwd", "_states_bwd") and not causal)
        pointers[name] = None if optional else (dtype if name in INPUTS else "*fp32")
    flags = {"HAS_INITIAL": with_states, "HAS_DFINAL": with_states, "STORE_CHUNKS": causal, "CAUSAL": causal}
    tiles = dict(BT=16, BK=32, BV=64) if gated else dict(BT=64, BK=64, BV=64)
    constexprs = dict(tiles, GATED=gated, PRECISION="ieee" if dtype == "*fp32" else "tf32",
                      **{name: flags[name] for name in SWITCHES[kernel]})
    return dict(kernel=f"attnzoo.kernels.linear:{kernel}", pointers=pointers, floats=["scale"],
                constexprs=constexprs, arch=arch, num_warps=4)


def test_linear_kernels_compile_for_sm80_and_sm90():
    jobs = [_job(kernel, *variant[:-1]) for variant in VARIANTS for kernel in variant[-1]]
    result = compile_in_subprocess(jobs)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("ok ") == len(jobs), result.stdout
