"""The sweep: every case (input x dtype x causal x batch x heads x D x N), every contender, every mode.

For each case the inputs are made once (seeded) and `dense` runs first: its output is the reference
for every row's error and its time the reference for every row's speedup, so all rows of a case
compare the same causal flag, shape, dtype and inputs. A contender that cannot run a case is skipped
with its reason; one that fails is skipped with the error, and the sweep goes on.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import torch

import attnzoo

from . import metrics, timing
from .config import ConfigError, SweepConfig
from .contenders import Case, ZooMethod, baselines
from .inputs import make_qkv
from .progress import Progress

REFERENCE = "dense"
KERNEL_ONLY = "block_sparse"  # times a sparse method's own mask without its estimator

COLUMNS = (
    "method", "kind", "family", "backend", "mode", "input", "dtype", "causal", "batch", "heads",
    "kv_heads", "seqlen", "head_dim", "time_ms", "speedup_vs_dense", "tflops_dense_equiv",
    "tflops_computed", "peak_mem_mib", "density", "estimator_share", "rel_err_vs_dense", "params",
)


@dataclass
class SweepResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def resolve_dtypes(dtypes: tuple[str, ...], device: torch.device) -> tuple[str, ...]:
    """'auto' is bfloat16 on CUDA and float32 on CPU (where bfloat16 matmuls are slow)."""
    natural = "bfloat16" if device.type == "cuda" else "float32"
    return tuple(dict.fromkeys(natural if d == "auto" else d for d in dtypes))


def method_names(requested: tuple[str, ...]) -> list[str]:
    """Registry names to sweep, `dense` first (always run: it is the reference)."""
    known = attnzoo.list_methods()
    names = known if "all" in requested else list(requested)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return [REFERENCE] + [n for n in dict.fromkeys(names) if n != REFERENCE]


def cases(config: SweepConfig, dtypes: tuple[str, ...]) -> list[Case]:
    grid = itertools.product(config.inputs, dtypes, config.causal, config.batch, config.heads,
                             config.head_dims, config.seqlens)
    return [Case(kind, dtype, causal, batch, heads, config.kv_heads or heads, seqlen, head_dim)
            for kind, dtype, causal, batch, heads, head_dim, seqlen in grid]


def _error_text(err: BaseException) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line}"[:300]


class Sweep:
    def __init__(self, config: SweepConfig, device: torch.device):
        self.config = config
        self.device = device
        self.dtypes = resolve_dtypes(config.dtypes, device)
        names = method_names(config.methods)
        unswept = sorted(set(config.params) - set(names))
        if unswept:
            raise ConfigError(f"params given for method(s) not in the sweep: {', '.join(unswept)}")
        zoo = [ZooMethod(name, config.params.get(name, {}), config.backend) for name in names]
        self.contenders = zoo + baselines(config.baselines, device)
        self.kernel_only = self._kernel_only_method()
        self.result = SweepResult()

    def _kernel_only_method(self) -> ZooMethod | None:
        if KERNEL_ONLY not in attnzoo.list_methods():
            return None
        return ZooMethod(KERNEL_ONLY, requested_backend=self.config.backend)

    def run(self) -> SweepResult:
        all_cases = cases(self.config, self.dtypes)
        progress = Progress(len(all_cases) * len(self.contenders))
        try:
            for case in all_cases:
                self._run_case(case, progress)
        finally:
            progress.close()
        return self.result

    def _skip(self, progress: Progress, contender, case: Case, reason: str, mode: str = "all") -> None:
        entry = {"method": contender.label, "mode": mode, **vars(case), "reason": reason}
        self.result.skipped.append(entry)
        progress.note(f"skip {contender.label} ({mode}, {case.input} {case.dtype} causal={case.causal} "
                      f"N={case.seqlen} D={case.head_dim}): {reason}")

    def _run_case(self, case: Case, progress: Progress) -> None:
        q, k, v = make_qkv(case.input, batch=case.batch, heads=case.heads, kv_heads=case.kv_heads,
                           seqlen=case.seqlen, head_dim=case.head_dim, dtype=case.torch_dtype,
                           device=self.device, seed=self.config.seed)
        case_rows: list[dict[str, Any]] = []
        reference = None  # dense's output; dense is contender 0
        for index, contender in enumerate(self.contenders):
            reason = contender.skip_reason(case, self.device)
            if reason is None and index > 0 and reference is None:
                reason = "dense could not run this case, so there is no reference"
            if reason is None:
                rows, out = self._measure(contender, case, q, k, v, reference, progress)
                reference = out if index == 0 else reference
                case_rows += rows
            else:
                self._skip(progress, contender, case, reason)
            progress.advance(f"{contender.label} N={case.seqlen} D={case.head_dim}")
        _fill_speedups(case_rows)
        self.result.rows += case_rows

    def _measure(self, contender, case, q, k, v, reference, progress):
        """Rows of one contender on one case (one per mode it can run), and its output."""
        try:
            torch.manual_seed(self.config.seed)  # extra inputs from example_kwargs are reproducible too
            forward = contender.bind(q, k, v, case, self.device)
            with torch.no_grad():
                out, block_mask = _first_forward(contender, forward, q, k, v)
            base = self._row_base(contender, case, out, block_mask, reference)
        except Exception as err:  # a failing method is reported, the sweep goes on
            self._skip(progress, contender, case, _error_text(err))
            self._release_memory()
            return [], None
        rows = []
        for mode in self.config.modes:
            if mode == "fwd+bwd" and not contender.supports_backward:
                self._skip(progress, contender, case, "no backward", mode)
                continue
            try:
                timed = self._timed(contender, forward, case, (q, k, v), out, mode, block_mask)
                rows.append({**base, "mode": mode, **timed})
            except Exception as err:
                self._skip(progress, contender, case, _error_text(err), mode)
                self._release_memory()
        return rows, out

    def _release_memory(self) -> None:
        """After a failure (often out of memory on large N), give cached CUDA memory back."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _row_base(self, contender, case: Case, out, block_mask, reference) -> dict[str, Any]:
        if block_mask is not None:
            density = metrics.density(block_mask, case.seqlen, case.seqlen, causal=case.causal)
        else:
            density = 1.0 if contender.family == "exact" else None
        return {
            "method": contender.name,
            "kind": contender.kind,
            "family": contender.family,
            "backend": contender.backend(self.device),
            **vars(case),
            "density": density,
            "rel_err_vs_dense": 0.0 if reference is None else metrics.relative_error(out, reference),
            "params": json.dumps(contender.params, sort_keys=True, default=str),
        }

    def _timed(self, contender, forward, case: Case, qkv, out, mode: str, block_mask) -> dict[str, Any]:
        step = _step(forward, *qkv, mode, out)
        config = self.config
        time_ms = timing.median_ms(step, self.device, warmup=config.warmup, repeats=config.repeats)
        shape = (case.batch, case.heads, case.seqlen, case.seqlen, case.head_dim, case.head_dim)
        dense_flops = metrics.dense_equivalent_flops(*shape, causal=case.causal, mode=mode)
        computed = _computed_flops(contender.family, block_mask, shape, case.causal, mode, dense_flops)
        return {
            "time_ms": time_ms,
            "tflops_dense_equiv": dense_flops / time_ms / 1e9,
            "tflops_computed": None if computed is None else computed / time_ms / 1e9,
            "peak_mem_mib": timing.peak_memory_mib(step, self.device),
            "estimator_share": self._estimator_share(contender, block_mask, case, qkv, out, mode, time_ms),
        }

    def _estimator_share(self, contender, block_mask, case, qkv, out, mode, time_ms) -> float | None:
        """Share of the method's time spent choosing blocks: 1 - (time of the block-sparse kernel
        alone on the same mask) / (time of the method)."""
        if block_mask is None:
            return None
        if contender.name == KERNEL_ONLY:
            return 0.0
        if self.kernel_only is None or self.kernel_only.skip_reason(case, self.device) is not None:
            return None
        kernel = self.kernel_only.bind(*qkv, case, self.device)
        step = _step(lambda q, k, v: kernel(q, k, v, block_mask=block_mask), *qkv, mode, out)
        kernel_ms = timing.median_ms(step, self.device, warmup=self.config.warmup, repeats=self.config.repeats)
        return min(1.0, max(0.0, 1.0 - kernel_ms / time_ms))


def _first_forward(contender, forward, q, k, v):
    """(output, block mask or None): sparse methods are asked for the blocks they chose."""
    if contender.returns_block_mask:
        return forward(q, k, v, return_block_mask=True)
    return forward(q, k, v), None


def _step(forward, q, k, v, mode: str, out_like: torch.Tensor):
    """A no-argument callable that runs one forward (no autograd), or one forward + backward with a
    fixed random output gradient shaped like `out_like`."""
    if mode == "fwd":
        def run_forward():
            with torch.no_grad():
                return forward(q, k, v)
        return run_forward

    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    generator = torch.Generator(device=out_like.device).manual_seed(0)
    grad_out = torch.randn(out_like.shape, generator=generator, device=out_like.device, dtype=out_like.dtype)

    def run_forward_backward():
        for leaf in leaves:
            leaf.grad = None
        forward(*leaves).backward(grad_out)

    return run_forward_backward


def _computed_flops(family, block_mask, shape, causal, mode, dense_flops) -> float | None:
    """FLOPs the contender actually multiplies: from its block mask (sparse), the dense count
    (exact), unknown for linear methods (no N x M work to count)."""
    if block_mask is not None:
        return metrics.computed_flops(block_mask, *shape, causal=causal, mode=mode)
    return dense_flops if family == "exact" else None


def _fill_speedups(rows: list[dict[str, Any]]) -> None:
    dense_ms = {r["mode"]: r["time_ms"] for r in rows if r["method"] == REFERENCE and r["kind"] == "attnzoo"}
    for row in rows:
        reference = dense_ms.get(row["mode"])
        row["speedup_vs_dense"] = None if reference is None else reference / row["time_ms"]
