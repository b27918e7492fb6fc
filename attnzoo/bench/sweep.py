"""The sweep: every case (input x dtype x causal x batch x heads x D x N), every contender, every mode.

For each case the inputs are made once and every contender runs on them: first one forward, whose
output gives the row's errors (against float64 references, `errors`) and, for sparse methods, the
blocks they chose; then, per mode, all contenders are timed together, interleaved (`timing`). `dense`
with its registry defaults always runs first: its time is the reference for every speedup. A
contender that cannot run a case is skipped with its reason; one that fails is skipped with the
error, and the sweep goes on.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

import attnzoo

from . import metrics, timing
from .config import ConfigError, SweepConfig
from .contenders import Bound, Case, ZooMethod, baselines, params_json, zoo_contenders
from .errors import References, approximates_softmax, exact_name, relative_error
from .inputs import Unavailable, head_dims, make_qkv
from .progress import Progress

REFERENCE = "dense"
KERNEL_ONLY = "block_sparse"  # times a sparse method's own mask without its estimator

COLUMNS = (
    "method", "params_set", "kind", "family", "backend", "device", "mode",
    "input", "dtype", "causal", "batch", "heads", "kv_heads", "seqlen", "head_dim",
    "time_ms", "time_q1_ms", "time_q3_ms", "time_rel_iqr", "noisy", "samples",
    "speedup_vs_dense", "tflops_dense_equiv", "tflops_computed", "peak_mem_mib",
    "density", "estimator_share", "err_vs_exact", "err_vs_dense", "params",
)


@dataclass
class SweepResult:
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class Entry:
    """A contender that ran its first forward on a case: what its rows share."""

    contender: Any
    bound: Bound
    block_mask: Any
    base: dict[str, Any]


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def device_label(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def resolve_dtypes(dtypes: tuple[str, ...], device: torch.device) -> tuple[str, ...]:
    """'auto' is bfloat16 on CUDA and float32 on CPU (where bfloat16 matmuls are slow)."""
    natural = "bfloat16" if device.type == "cuda" else "float32"
    return tuple(dict.fromkeys(natural if d == "auto" else d for d in dtypes))


def method_names(requested: tuple[str, ...]) -> list[str]:
    """Registry names to sweep, in registry order."""
    known = attnzoo.list_methods()
    names = known if "all" in requested else list(dict.fromkeys(requested))
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def cases(config: SweepConfig, dtypes: tuple[str, ...]) -> list[Case]:
    """Every case of the sweep; an input kind whose source fixes the head dim (minilm) uses its own."""
    found = []
    for kind, dtype, causal, batch, heads in itertools.product(config.inputs, dtypes, config.causal,
                                                                config.batch, config.heads):
        for head_dim, seqlen in itertools.product(head_dims(kind, config.head_dims), config.seqlens):
            found.append(Case(kind, dtype, causal, batch, heads, config.kv_heads or heads, seqlen, head_dim))
    return list(dict.fromkeys(found))


def _error_text(err: BaseException) -> str:
    first_line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first_line}"[:300]


def _case_text(case: Case) -> str:
    return (f"{case.input} {case.dtype} {'causal' if case.causal else 'non-causal'} B={case.batch} "
            f"H={case.heads} N={case.seqlen} D={case.head_dim}")


class Sweep:
    def __init__(self, config: SweepConfig, device: torch.device):
        self.config = config
        self.device = device
        self.dtypes = resolve_dtypes(config.dtypes, device)
        names = method_names(config.methods)
        unswept = sorted(set(config.params) - set(names))
        if unswept:
            raise ConfigError(f"params given for method(s) not in the sweep: {', '.join(unswept)}")
        self.reference = ZooMethod(REFERENCE, requested_backend=config.backend)
        zoo = [c for name in names for c in zoo_contenders(name, config.params.get(name, {}), config.backend)]
        zoo = [c for c in zoo if not (c.name == REFERENCE and not c.params_set)]  # the reference runs already
        self.contenders = [self.reference, *zoo, *baselines(config.baselines, device)]
        self.kernel_only = ZooMethod(KERNEL_ONLY, requested_backend=config.backend)
        self.result = SweepResult()

    @property
    def _steps_per_case(self) -> int:
        """Progress units of one case: a first forward per contender, then a timing round per mode."""
        return len(self.contenders) + len(self.config.modes) * self.config.repeats

    def run(self) -> SweepResult:
        all_cases = cases(self.config, self.dtypes)
        progress = Progress(len(all_cases) * self._steps_per_case)
        try:
            for case in all_cases:
                self._run_case(case, progress)
        finally:
            progress.close()
        return self.result

    def _skip(self, progress: Progress, label: str, case: Case, reason: str, mode: str = "all") -> None:
        self.result.skipped.append({"method": label, "mode": mode, **vars(case), "reason": reason})
        progress.note(f"skip {label} ({mode}, {_case_text(case)}): {reason}")

    def _note(self, progress: Progress, message: str) -> None:
        self.result.notes.append(message)
        progress.note(message)

    def _run_case(self, case: Case, progress: Progress) -> None:
        try:
            qkv = make_qkv(case.input, batch=case.batch, heads=case.heads, kv_heads=case.kv_heads,
                           seqlen=case.seqlen, head_dim=case.head_dim, dtype=case.torch_dtype,
                           device=self.device, seed=self.config.seed)
        except Unavailable as err:
            self._skip(progress, "all methods", case, str(err))
            progress.advance(f"{_case_text(case)}: no inputs", self._steps_per_case)
            return
        references = References(*qkv, causal=case.causal)
        if not references.measurable:
            self._note(progress, f"{_case_text(case)}: {references.too_large}")
        entries = []
        for contender in self.contenders:
            entry = self._prepare(contender, case, qkv, references, progress)
            entries += [] if entry is None else [entry]
            progress.advance(f"{contender.label} {_case_text(case)}")
        for mode in self.config.modes:
            self.result.rows += self._time_mode(mode, entries, case, qkv, progress)
        self._release_memory()

    def _prepare(self, contender, case: Case, qkv, references: References, progress: Progress) -> Entry | None:
        reason = contender.skip_reason(case, self.device)
        if reason is not None:
            self._skip(progress, contender.label, case, reason)
            return None
        try:
            bound = contender.bind(*qkv, case, self.device, self.config.seed)
            with torch.no_grad():
                out, block_mask = _first_forward(contender, bound.forward, *qkv)
            base = self._row_base(contender, case, bound, out, block_mask, references, progress)
        except Exception as err:  # a failing method is reported, the sweep goes on
            self._skip(progress, contender.label, case, _error_text(err))
            self._release_memory()
            return None
        return Entry(contender, bound, block_mask, base)

    def _release_memory(self) -> None:
        """Give cached CUDA memory back between cases and after failures (often out of memory)."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _row_base(self, contender, case: Case, bound: Bound, out, block_mask, references, progress) -> dict[str, Any]:
        if block_mask is not None:
            density = metrics.density(block_mask, case.seqlen, case.seqlen, causal=case.causal)
        else:
            density = 1.0 if contender.family == "exact" else None
        err_vs_exact, err_vs_dense = self._errors(contender, bound, out, block_mask, references, progress)
        return {
            "method": contender.name,
            "params_set": params_json(contender.params_set),
            "kind": contender.kind,
            "family": contender.family,
            "backend": contender.backend(self.device),
            "device": device_label(self.device),
            **vars(case),
            "density": density,
            "err_vs_exact": err_vs_exact,
            "err_vs_dense": err_vs_dense,
            "params": params_json(contender.received),
        }

    def _errors(self, contender, bound: Bound, out, block_mask, references: References, progress):
        """(err_vs_exact, err_vs_dense) of the first forward's output; None where not measured."""
        if not references.measurable:
            return None, None
        err_vs_dense = relative_error(out, references.dense) if approximates_softmax(contender.family, bound.inputs) \
            else None
        oracle = exact_name(contender.exact_as, contender.family)
        if oracle is None:
            self._note(progress, f"err_vs_exact of {contender.label}: attnzoo.reference has no oracle for it")
            return None, err_vs_dense
        params = contender.received if oracle == contender.exact_as else {}
        try:
            exact = references.exact(oracle, params=params, inputs=bound.inputs, block_mask=block_mask)
        except Exception as err:
            self._note(progress, f"err_vs_exact of {contender.label}: {_error_text(err)}")
            return None, err_vs_dense
        return relative_error(out, exact), err_vs_dense

    def _time_mode(self, mode: str, entries: list[Entry], case: Case, qkv, progress: Progress) -> list[dict]:
        """Rows of one mode: every entry that can run it, timed together (interleaved)."""
        runner = _Runner(mode, qkv)
        kernel = self._kernel_forward(case, qkv)
        steps: dict[Any, Any] = {}
        for index, entry in enumerate(entries):
            if mode == "fwd+bwd" and not entry.contender.supports_backward:
                self._skip(progress, entry.contender.label, case, "no backward", mode)
                continue
            steps[index] = runner.step(entry.bound.forward)
            if kernel is not None and entry.block_mask is not None and entry.contender.name != KERNEL_ONLY:
                steps[("kernel", index)] = runner.step(functools.partial(kernel, block_mask=entry.block_mask))
        config = self.config
        timings, failures = timing.measure(
            steps, self.device, warmup=config.warmup, repeats=config.repeats, sample_ms=config.sample_ms,
            on_round=lambda r: progress.advance(f"{mode} round {r + 1}/{config.repeats} {_case_text(case)}"))
        for key, err in failures.items():
            if isinstance(key, int):
                self._skip(progress, entries[key].contender.label, case, _error_text(err), mode)
        reference = next((timings.get(i) for i, e in enumerate(entries) if e.contender is self.reference), None)
        return [self._row(entries[i], case, mode, timings[i], timings.get(("kernel", i)), reference, steps[i])
                for i in steps if isinstance(i, int) and i in timings]

    def _kernel_forward(self, case: Case, qkv):
        """The block_sparse kernel, to time alone on the blocks a sparse method chose (its estimator
        left out); None when it cannot run the case."""
        if self.kernel_only.skip_reason(case, self.device) is not None:
            return None
        return self.kernel_only.bind(*qkv, case, self.device, self.config.seed).forward

    def _row(self, entry: Entry, case: Case, mode: str, timed: timing.Timing, kernel: timing.Timing | None,
             reference: timing.Timing | None, step) -> dict[str, Any]:
        shape = (case.batch, case.heads, case.seqlen, case.seqlen, case.head_dim, case.head_dim)
        dense_flops = metrics.dense_equivalent_flops(*shape, causal=case.causal, mode=mode)
        computed = _computed_flops(entry.contender.family, entry.block_mask, shape, case.causal, mode, dense_flops)
        time_ms = timed.median_ms
        return {
            **entry.base,
            "mode": mode,
            "time_ms": time_ms,
            "time_q1_ms": timed.q1_ms,
            "time_q3_ms": timed.q3_ms,
            "time_rel_iqr": timed.rel_iqr,
            "noisy": timed.noisy,
            "samples": timed.samples,
            "speedup_vs_dense": None if reference is None else reference.median_ms / time_ms,
            "tflops_dense_equiv": dense_flops / time_ms / 1e9,
            "tflops_computed": None if computed is None else computed / time_ms / 1e9,
            "peak_mem_mib": timing.peak_memory_mib(step, self.device),
            "estimator_share": _estimator_share(entry, kernel, time_ms),
        }


class _Runner:
    """Turns a forward into the no-argument step timed in one mode. fwd: a forward without autograd.
    fwd+bwd: a forward and a backward with a fixed random output gradient, on q, k, v leaves shared
    by every contender of the case."""

    def __init__(self, mode: str, qkv):
        self.mode = mode
        self.qkv = qkv
        if mode == "fwd+bwd":
            self.leaves = [t.detach().clone().requires_grad_(True) for t in qkv]
            q, _, v = qkv
            generator = torch.Generator(device=q.device).manual_seed(0)
            shape = (*q.shape[:-1], v.shape[-1])
            self.grad_out = torch.randn(shape, generator=generator, device=q.device, dtype=q.dtype)

    def step(self, forward):
        if self.mode == "fwd":
            q, k, v = self.qkv

            def run_forward():
                with torch.no_grad():
                    return forward(q, k, v)

            return run_forward

        leaves, grad_out = self.leaves, self.grad_out

        def run_forward_backward():
            for leaf in leaves:
                leaf.grad = None
            forward(*leaves).backward(grad_out)

        return run_forward_backward


def _first_forward(contender, forward, q, k, v):
    """(output, block mask or None): sparse methods are asked for the blocks they chose."""
    if contender.returns_block_mask:
        return forward(q, k, v, return_block_mask=True)
    return forward(q, k, v), None


def _estimator_share(entry: Entry, kernel: timing.Timing | None, time_ms: float) -> float | None:
    """Share of a sparse method's time spent choosing blocks: 1 - t(block_sparse kernel alone on the same
    mask) / t(method); 0 for block_sparse itself (its mask is given), None without a mask."""
    if entry.block_mask is None:
        return None
    if entry.contender.name == KERNEL_ONLY:
        return 0.0
    return None if kernel is None else min(1.0, max(0.0, 1.0 - kernel.median_ms / time_ms))


def _computed_flops(family, block_mask, shape, causal, mode, dense_flops) -> float | None:
    """FLOPs the contender actually multiplies: from its block mask (sparse), the dense count
    (exact), unknown for linear methods (no N x M work to count)."""
    if block_mask is not None:
        return metrics.computed_flops(block_mask, *shape, causal=causal, mode=mode)
    return dense_flops if family == "exact" else None
