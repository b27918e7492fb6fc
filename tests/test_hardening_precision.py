"""Half precision (issue 16, item 4): fp16 and bf16 inputs scaled up to x100 give finite outputs and
gradients for every method, with an error against float64 within 4x that of the same computation
done by torch in that dtype.

- Inputs: q, k, v ~ N(0, 1) * 100 rounded to the dtype; the float64 oracle (attnzoo/reference) runs on
  the rounded inputs, so errors measure the computation only. Errors are max |got - exact| over
  max |exact|, for the output and for dq, dk, dv of <out, dout> with dout ~ N(0, 1) in the dtype.
- "Torch in that dtype": for the softmax family, torch's SDPA in the dtype with the method's element
  mask (its chosen blocks, causal) or bias; for the linear family the method's own formula (the
  attnzoo/reference function) run in the dtype, and where that overflows (BASED's 1 + s + s^2 / 2 at
  s ~ 1e4, ELU features summed over the sequence) the same formula in float32 rounded to the dtype,
  which is what attnzoo promises (feature maps, states and products in fp32).
- The bound is 4 x max(torch's error, floor). The floor is u, the unit roundoff of the dtype (one
  rounding of the output: torch's error can be ~0 when softmax is one-hot and the output is a copy of
  v), plus for the softmax family 2^-24 max |s|, the resolution of the largest fp32 score s: a kernel
  that recomputes P = exp(s - lse) in its backward or merges partial results by their lse (FlashAttention,
  the torch twin) has errors of that size in P.
- Where the exact output or gradient is not representable in the dtype it is not compared: gla is
  unnormalised, so at x100 in fp16 its output (~1e7) overflows; it runs at x10 there.
- Gradients must be finite for every method; their error is held to the bound for the linear family.
  For the softmax family at x100 the gradient error against float64 is O(1) for every
  FlashAttention-style backward, torch's SDPA included: delta = rowsum(dO * O) comes from the rounded
  output, and P = exp(s - lse) is recomputed from fp32 scores of size ~1e4 (resolved to ~1e-3), while
  dq sums terms of size |dS| |k| ~ 100x the result. Those figures are measured, not bounded (see
  docs/hardening.md).
The torch backend runs 64 tokens, the Triton interpreter ("triton") 32; BASED runs at head dim 8 and
WERSA with 32 random features, to keep the file well under a minute.
"""

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import reference
from attnzoo.reference import based as ref_based
from attnzoo.reference import flashbias as ref_flashbias
from attnzoo.reference import gla as ref_gla
from attnzoo.reference import lawcat as ref_lawcat
from attnzoo.reference import wersa as ref_wersa
from attnzoo.reference.dense import expand_block_mask, visible_mask

DTYPES = [torch.float16, torch.bfloat16]
SCALE = 100.0
SCALE_WHERE_X100_OVERFLOWS = {("gla", torch.float16): 10.0}
FACTOR = 4.0
LENGTH = {"torch": 64, "triton": 32}
HEAD_DIM = {"based": 8}
PARAMS = {"wersa": {"num_features": 32}}
LINEAR = ("based", "gla", "lawcat", "wersa")


def shipped_methods() -> list[str]:
    return [name for name in attnzoo.list_methods() if attnzoo.info(name).fn_path.startswith("attnzoo.methods.")]


def unit_roundoff(dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rel_error(got, exact) -> float:
    return ((got.double() - exact).abs().max() / exact.abs().max()).item()


class Case:
    """One method on half-precision inputs: its call, its oracle and torch's computation in the dtype."""

    def __init__(self, method: str, dtype, scale: float, backend: str, seed: int = 0):
        self.method, self.dtype, self.backend = method, dtype, backend
        info = attnzoo.info(method)
        self.causal = info.supports.causal
        n, d = LENGTH[backend], HEAD_DIM.get(method, 16)
        gen = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(1, heads, n, d, generator=gen) * scale for heads in (4, 2, 2))
        self.q, self.k, self.v = (t.to(dtype) for t in (q, k, v))
        self.dout = torch.randn(1, 4, n, d, generator=gen).to(dtype)
        self.scale = d ** -0.5
        self.fn = attnzoo.get(method, **PARAMS.get(method, {}))
        self.params = {**info.params, **PARAMS.get(method, {})}
        hook = getattr(info.load_module(), "example_kwargs", None)
        with torch.random.fork_rng():  # example_kwargs may draw from the global generator
            torch.manual_seed(seed)
            kwargs = hook(self.q, self.k, self.v, causal=self.causal) if hook else {}
        self.params.update({name: x for name, x in kwargs.items() if name in info.params})
        self.inputs = {name: x for name, x in kwargs.items() if name not in info.params}
        self.blocks = self._chosen_blocks(kwargs) if "return_block_mask" in info.supports.outputs else None

    def _chosen_blocks(self, kwargs):
        _, block_mask = self.fn(self.q, self.k, self.v, causal=self.causal, backend=self.backend,
                                return_block_mask=True, **kwargs)
        return block_mask.to_dense(), block_mask.block_size

    def attnzoo(self, q, k, v):
        return self.fn(q, k, v, causal=self.causal, backend=self.backend, **self.params, **self.inputs)

    def exact(self, q, k, v):
        return reference.exact_output(self.method, q, k, v, causal=self.causal, scale=self.scale, params=self.params,
                                      inputs=self.inputs, block_mask=self.blocks)

    def torch_in(self, dtype):
        """torch's computation of this case in `dtype`, as a function of (q, k, v)."""
        given = {name: x.to(dtype) if isinstance(x, torch.Tensor) else x
                 for name, x in {**self.params, **self.inputs}.items()}
        if self.method in LINEAR:
            return lambda q, k, v: linear_formula(self.method, q, k, v, self.scale, self.causal, given)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(q, given),
                                                              scale=self.scale, enable_gqa=True)

    def _mask(self, q, given):
        """SDPA's attn_mask: the visible keys of the chosen blocks (bool), or flashbias's U W^T there."""
        n, m = q.shape[2], self.k.shape[2]
        keep = visible_mask(n, m, causal=self.causal)
        if self.blocks is not None:
            blocks, (block_q, block_k) = self.blocks
            keep = keep & expand_block_mask(blocks, n, m, block_q, block_k)
        if self.method != "flashbias":
            return keep
        u, w = given["bias_factors"]
        return ref_flashbias.factor_bias(u, w, q.shape[1]).masked_fill(~keep, float("-inf"))

    def score_resolution(self) -> float:
        """2^-24 max |scale q k^T|: how finely fp32 resolves the largest score. A backward that recomputes
        P = exp(s - lse) (FlashAttention) has errors of this size in P wherever the scores are huge."""
        group = self.q.shape[1] // self.k.shape[1]
        scores = torch.einsum("bhnd,bhmd->bhnm", self.q.double(), self.k.double().repeat_interleave(group, dim=1))
        return 2.0 ** -24 * self.scale * scores.abs().max().item()


def linear_formula(method, q, k, v, scale, causal, given):
    """The linear method's formula (its reference function) in the dtype of q, k, v; `given` holds its
    parameters and inputs."""
    if method == "gla":
        return ref_gla.gla(q, k, v, scale=scale, g=given.get("g"))[0]
    if method == "based":
        return ref_based.based(q, k, v, causal=causal, scale=scale, use_norm=given["use_norm"], eps=given["eps"])
    if method == "lawcat":
        return ref_lawcat.lawcat(q, k, v, g=given.get("g"), conv_q=given.get("conv_q"), conv_k=given.get("conv_k"),
                                 eps=given["eps"])
    return ref_wersa.wersa(q, k, v, levels=given["levels"], num_features=given["num_features"], gains=given["gains"],
                           seed=given["seed"])


def with_grads(fn, tensors, dout):
    """(out, [dq, dk, dv]) of <fn(q, k, v), dout>."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * dout.to(out.dtype)).sum().backward()
    return [out.detach()] + [t.grad for t in leaves]


def errors(case: Case) -> dict:
    """name -> (attnzoo's error, torch-in-dtype's error, representable) for out, dq, dk, dv."""
    qkv = (case.q, case.k, case.v)
    exact = with_grads(case.exact, [t.double() for t in qkv], case.dout.double())
    got = with_grads(case.attnzoo, qkv, case.dout)
    in_dtype = with_grads(case.torch_in(case.dtype), qkv, case.dout)
    if not all(bool(torch.isfinite(t).all()) for t in in_dtype):  # the formula overflows in the dtype
        wide = with_grads(case.torch_in(torch.float32), [t.float() for t in qkv], case.dout)
        in_dtype = [t.to(case.dtype) for t in wide]
    limit = torch.finfo(case.dtype).max
    return {name: (rel_error(a, e) if torch.isfinite(a).all() else float("inf"), rel_error(b, e),
                   bool(e.abs().max() < limit))
            for name, a, b, e in zip(("out", "dq", "dk", "dv"), got, in_dtype, exact)}


def scale_of(method, dtype) -> float:
    return SCALE_WHERE_X100_OVERFLOWS.get((method, dtype), SCALE)


def error_floor(case: Case) -> float:
    """The smallest error the bound allows: one rounding to the dtype, plus, for the softmax family,
    fp32's resolution of the largest score (see Case.score_resolution)."""
    return unit_roundoff(case.dtype) + (0.0 if case.method in LINEAR else case.score_resolution())


def compared(method: str) -> tuple[str, ...]:
    """What is held to the 4x bound: the output, and the gradients of the linear family (see the module
    docstring for why not those of the softmax family)."""
    return ("out", "dq", "dk", "dv") if method in LINEAR else ("out",)


def check_case(method, dtype, backend):
    case = Case(method, dtype, scale_of(method, dtype), backend)
    found = errors(case)
    assert all(representable for *_, representable in found.values()), found
    assert all(ours < float("inf") for ours, *_ in found.values()), f"non-finite output or gradient: {found}"
    floor = error_floor(case)
    for name in compared(method):
        ours, theirs, _ = found[name]
        assert ours <= FACTOR * max(theirs, floor), f"{method} {dtype} {name}: {ours:.2e} vs torch {theirs:.2e}"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", shipped_methods())
def test_torch_backend_stays_within_4x_of_torch_in_the_dtype(method, dtype):
    check_case(method, dtype, "torch")


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["dense", "xattention", "based", "lawcat", "wersa"])
def test_triton_interpreter_stays_within_4x_of_torch_in_the_dtype(method, dtype):
    """The kernels' half-precision paths: the flash kernel dense and over a sparse index (the other
    sparse methods and flashbias run the same kernel), the linear kernel causal, gated (lawcat; gla's
    path) and non-causal (wersa), on fp32 features with half-precision values."""
    check_case(method, dtype, "triton")


def test_gla_at_x100_in_fp16_is_the_case_that_overflows():
    """Why gla runs at x10 in fp16: its exact unnormalised output at x100 exceeds fp16's range."""
    case = Case("gla", torch.float16, SCALE, "torch")
    assert case.exact(case.q.double(), case.k.double(), case.v.double()).abs().max() > torch.finfo(torch.float16).max


@pytest.mark.parametrize("backend, n, d", [("torch", 64, 16), ("triton", 16, 8)])
def test_based_in_fp16_with_keys_x100_is_finite(backend, n, d):
    """The issue's case: BASED's Taylor features formed in fp16 overflowed (a key entry of 300 squares
    to 9e4 > 65504)."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, d, generator=gen) for _ in range(3))
    k[0, 0, 0, 0] = 3.0
    q, k, v = (q * 100).half(), (k * 100).half(), v.half()
    out = attnzoo.get("based")(q, k, v, causal=True, backend=backend)
    exact = reference.exact_output("based", q, k, v, causal=True, scale=d ** -0.5, params={}, inputs={})
    assert torch.isfinite(out).all() and rel_error(out, exact) < 4 * unit_roundoff(torch.float16)
