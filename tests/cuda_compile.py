"""Compile Triton kernels for a CUDA target on a machine without a GPU, and measure them.

The interpreter runs kernels as NumPy and accepts code the real compiler rejects (non-constexpr
globals, Python builtins on tensors, bad casts). Triton's own compiler, LLVM and ptxas ship in the
wheel, so a kernel can be compiled to a cubin for sm_80/sm_90a here, which catches compiler-only
errors before a GPU ever sees the code, and ptxas's own report (`-v`, which Triton always passes)
gives the registers, spill bytes and stack frame of the real build.

Argument specialisation is done the way a real launch does it (a stand-in for the driver's
specialisation): pointers are 16-byte aligned (`tt.divisibility` 16), an integer argument given a
sample value of 1 becomes the constant 1 (unit strides), and one divisible by 16 gets
`tt.divisibility` 16. Without that the compiler cannot vectorise the loads (no 16-byte cp.async).

The test process runs kernels under the interpreter (TRITON_INTERPRET=1 turns every @triton.jit
into an interpreted function), so compiling happens in a child process without it:
`compile_in_subprocess(jobs)` runs this file with a JSON list of jobs and prints one JSON line per job.
"""

import contextlib
import importlib
import io
import json
import os
import re
import subprocess
import sys


def compile_for_cuda(fn, *, pointers: dict, floats=(), constexprs: dict, arch: int = 90,
                     num_warps: int = 4, num_stages: int = 3, ints: dict | None = None):
    """Compile `fn` (a @triton.jit function) to a cubin. `pointers` maps pointer args to Triton dtype
    strings ("*bf16", "*fp32", ...; None for an unused pointer), `floats` names the fp32 scalars,
    every other non-constexpr arg is an i32; `ints` gives sample values of some of them, specialised
    like a launch would (1 -> constant, multiple of 16 -> divisibility 16). Returns (compiled kernel,
    ptxas log)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile as triton_compile

    fn = getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn  # unwrap autotuners
    ints = ints or {}
    signature, constants, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
        elif name in pointers:
            if pointers[name] is None:
                signature[name], constants[name] = "constexpr", None
            else:
                signature[name] = pointers[name]
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in floats:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            value = ints.get(name)
            if value == 1:
                signature[name], constants[name] = "constexpr", 1
            elif value is not None and value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constants.items()},
                       attrs=attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    with contextlib.redirect_stdout(log):
        compiled = triton_compile(source, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages))
    return compiled, log.getvalue()


def measure(compiled, ptxas_log: str) -> dict:
    """Resource use of a compiled kernel: registers, spill bytes (stores + loads), stack frame and
    shared memory (bytes), the MMA instructions and whether it uses TMA / warp specialisation."""
    def grab(pattern):
        found = re.search(pattern, ptxas_log)
        return int(found.group(1)) if found else 0
    ptx = compiled.asm.get("ptx", "")
    mma = sorted({m.group(0) for m in re.finditer(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]+", ptx)})
    kinds = set()
    for m in mma:
        shape = re.search(r"\.(m\d+n\d+k\d+)\.", m)
        dtype = "bf16" if ".bf16" in m else "f16" if ".f16" in m else "tf32" if ".tf32" in m else \
            "f64" if ".f64" in m else "f8" if ".e4m3" in m or ".e5m2" in m else "?"
        kinds.add(f"{'wgmma' if m.startswith('wgmma') else 'mma.sync'}.{shape.group(1) if shape else '?'}.{dtype}")
    return dict(regs=grab(r"Used (\d+) registers"),
                spill=grab(r"(\d+) bytes spill stores") + grab(r"(\d+) bytes spill loads"),
                stack=grab(r"(\d+) bytes stack frame"),
                shared=int(compiled.metadata.shared),
                mma="+".join(sorted(kinds)) or "none",
                tma="cp.async.bulk.tensor" in ptx,
                ws="setmaxnreg" in ptx,
                cp_async="cp.async.cg" in ptx or "cp.async.ca" in ptx)


def compile_in_subprocess(jobs: list[dict], timeout: int = 600) -> subprocess.CompletedProcess:
    """Each job: {"kernel": "module:name", "pointers", "floats", "constexprs", "arch", "num_warps",
    "num_stages", "ints"} (plus any "tag" keys, echoed back). Prints one JSON line per job:
    the job's tag, "ok", and measure()'s numbers (or "error")."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said explicitly
    return subprocess.run([sys.executable, __file__], input=json.dumps(jobs), env=env, capture_output=True,
                          text=True, timeout=timeout)


def run_jobs(jobs, keep_going: bool = False):
    """Compile and measure each job in this process (no interpreter); yields (job, result)."""
    for job in jobs:
        job = dict(job)
        tag = job.pop("tag", None)
        module_name, _, attr = job.pop("kernel").partition(":")
        fn = getattr(importlib.import_module(module_name), attr)
        try:
            compiled, log = compile_for_cuda(fn, **job)
            if "Used" not in log:
                raise RuntimeError("no ptxas report (was the compile cached?)")
            result = dict(ok=True, **measure(compiled, log))
        except Exception as exc:  # noqa: BLE001 - reported per job
            if not keep_going:
                raise
            result = dict(ok=False, error=f"{type(exc).__name__}: {str(exc)[:300]}")
        yield tag, f"{module_name}:{attr}", result


def _main() -> int:
    for tag, name, result in run_jobs(json.load(sys.stdin)):
        print("ok " + json.dumps(dict(tag=tag, kernel=name, **result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
