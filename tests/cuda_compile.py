"""Compile Triton kernels for a CUDA target on a machine without a GPU.

The interpreter runs kernels as NumPy and accepts code the real compiler rejects (non-constexpr
globals, Python builtins on tensors, bad casts). Triton's own compiler, LLVM and ptxas ship in the
wheel, so a kernel can be compiled to a cubin for sm_80/sm_90 here, which catches compiler-only
errors before a GPU ever sees the code.

The test process runs kernels under the interpreter (TRITON_INTERPRET=1 turns every @triton.jit
into an interpreted function), so compiling happens in a child process without it:
`compile_in_subprocess(jobs)` runs this file with a JSON list of jobs.
"""

import importlib
import json
import os
import subprocess
import sys


def compile_for_cuda(fn, *, pointers: dict, floats=(), constexprs: dict, arch: int = 90,
                     num_warps: int = 4, num_stages: int = 3):
    """Compile `fn` (a @triton.jit function) to a cubin. `pointers` maps pointer args to Triton dtype
    strings ("*bf16", "*fp32", ...; None for an unused pointer), `floats` names the fp32 scalars,
    every other non-constexpr arg is an i32. Returns the compiled kernel (with .asm['cubin'])."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn  # unwrap autotuners
    signature, constants = {}, dict(constexprs)
    for name in fn.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            if pointers[name] is None:
                signature[name], constants[name] = "constexpr", None
            else:
                signature[name] = pointers[name]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()})
    return triton_compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def compile_in_subprocess(jobs: list[dict], timeout: int = 600) -> subprocess.CompletedProcess:
    """Each job: {"kernel": "module:name", "pointers", "floats", "constexprs", "arch", "num_warps"}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, __file__], input=json.dumps(jobs), env=env, capture_output=True,
                          text=True, timeout=timeout)


def _main() -> int:
    for job in json.load(sys.stdin):
        module_name, _, attr = job.pop("kernel").partition(":")
        fn = getattr(importlib.import_module(module_name), attr)
        compiled = compile_for_cuda(fn, **job)
        print(f"ok {module_name}:{attr} cubin={len(compiled.asm['cubin'])} bytes shared={compiled.metadata.shared}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
