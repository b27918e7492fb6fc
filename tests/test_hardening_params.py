"""Every parameter is validated at the API boundary (issue 16, item 7).

The walk is generated from registry.yaml: every parameter (and output flag) of every shipped method
gets wrong types (TypeError) and out-of-range values (ValueError), and the error must name it;
numbers given as numpy or 0-d tensor scalars must give the output of the Python number they hold.
A parameter added to the registry without an entry in the tables below fails
`test_every_registry_parameter_is_walked`, so new parameters are walked too. The cases the issue
reported are regression tests at the end. Inputs are tiny and errors come before any kernel, so the
whole file takes a few seconds (torch backend).
"""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnzoo

N, D, HEADS = 32, 16, 2
NAN, INF = float("nan"), float("inf")


def shipped_methods() -> list[str]:
    return [name for name in attnzoo.list_methods() if attnzoo.info(name).fn_path.startswith("attnzoo.methods.")]


def qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, HEADS, N, D, generator=gen) for _ in range(3))


# What a call needs besides q, k, v to run on 32 tokens (blocks of 16, a bias for flashbias's rank, ...).
BASE = {
    "block_sparse": lambda: {"block_size": 16, "block_mask": torch.ones(1, 1, 2, 2, dtype=torch.bool)},
    "flashbias": lambda: {"bias": torch.randn(1, 1, N, N, generator=torch.Generator().manual_seed(1))},
    "s2": lambda: {"block_size": 16, "local_blocks": 1, "vert_stride": 2},
    "seerattention": lambda: {"block_size": 16},
    "sparsed": lambda: {"block_size": 16},
    "xattention": lambda: {"block_size": 16},
}

# Kinds of the parameters whose registry default (None) does not show it.
OPTIONAL_KINDS = {"chunk_size": "int", "rank": "int", "threshold": "float", "topk_ratio": "float", "step": "int",
                  "total_steps": "int", "gen_len": "int", "head_sliding_step": "int", "gains": "tensor"}

# Wrong types of each kind: every one must raise TypeError naming the parameter.
WRONG_TYPES = {
    "bool": ["no", 1, 0.0],
    "int": [1.5, "4", True, [4]],
    "float": ["0.5", True, [0.5]],
    "window": ["-1", (1.5, 0), ("a", 0), (0,), 3],
    "choice": [3, None],
    "tensor": [[1.0, 1.0, 1.0]],
}

# Out-of-range values of each parameter, (method, name) first: ValueError naming the parameter.
BAD_VALUES = {
    ("xattention", "threshold"): [-0.5, NAN, INF],
    ("xattention", "chunk_size"): [0, 64],  # 64: chunk_size with selection="attnzoo"
    ("seerattention", "threshold"): [-0.1, 1.5, NAN],
    "eps": [0.0, -1.0, NAN, INF],
    "select": [-0.1, 1.5, NAN],
    "skip": [-1.0, INF],
    "topk_ratio": [0.0, 1.5],
    "stride": [0, 3, 32],  # 32 > block_size 16
    "block_size": [0, 8, 24],
    "local_blocks": [0],
    "vert_stride": [0],
    "num_dense_heads": [-1, HEADS + 1],
    "head_sliding_offset": [],  # any int is a phase
    "head_sliding_step": [-1],
    "homo_head": [],
    "levels": [-1],
    "num_features": [0],
    "seed": [-1, 2 ** 64],
    "chunk_size": [8, 24, 256],
    "rank": [0, N + 1],
    "last_blocks_dense": [-1],
    "softcap": [-1.0, NAN, INF],
    "window_size": [(-2, 0), (0, -3)],
    "step": [-1],
    "total_steps": [0],
    "gen_len": [0, N + 1],
    "gains": [],
    "selection": ["nope"],
    "feature_map": ["nope"],
    "use_norm": [],
    "return_lse": [],
    "return_block_mask": [],
    "output_final_state": [],
}

# A valid number for each numeric parameter (default used when it is a number), with what else the
# call needs for it to be read: numpy and 0-d tensor forms of it must give the same output.
VALID_NUMBER = {
    ("xattention", "chunk_size"): (32, {"selection": "official"}),
    ("seerattention", "threshold"): (0.25, {}),
    ("sparsed", "step"): (1, {"total_steps": 4}),
    ("sparsed", "total_steps"): (4, {"step": 1}),
    "chunk_size": (16, {}),
    "rank": (N, {}),  # full rank: no warning about the energy kept
    "topk_ratio": (0.5, {}),
    "gen_len": (8, {}),
    "head_sliding_step": (1, {}),
    "block_size": (16, {}),
    "local_blocks": (1, {}),
    "vert_stride": (2, {}),
    "softcap": (5.0, {}),
    "eps": (1e-3, {}),
    "select": (0.5, {}),
}


def lookup(table, method, name):
    return table[(method, name)] if (method, name) in table else table[name]


def kind_of(method: str, name: str) -> str:
    default = attnzoo.info(method).params.get(name, False)  # output flags are bools
    if default is None:
        return OPTIONAL_KINDS[name]
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    if isinstance(default, float):
        return "float"
    if isinstance(default, tuple):
        return "window"
    assert isinstance(default, str), (method, name, default)
    return "choice"


def walked(method: str) -> list[str]:
    info = attnzoo.info(method)
    return sorted(set(info.params) | set(info.supports.outputs))


def call(method: str, *, causal=None, **kwargs):
    """The method on qkv() with BASE's keywords overridden by `kwargs` (torch backend)."""
    extra = {**BASE.get(method, dict)(), **kwargs}
    if method == "sparsed" and extra.get("step") is not None:
        extra.setdefault("cache", {})
    return attnzoo.get(method)(*qkv(), causal=causal, backend="torch", **extra)


def names(name: str) -> str:
    """A regex matching `name` as a whole word of an error message."""
    return rf"(?<![\w.]){re.escape(name)}(?!\w)"


def first_output(result):
    return result[0] if isinstance(result, tuple) else result


def wrong_types(method: str, name: str) -> list:
    """WRONG_TYPES of the parameter's kind, and None where None is no default of it."""
    kind = kind_of(method, name)
    required = attnzoo.info(method).params.get(name, False) is not None and kind != "choice"
    return WRONG_TYPES[kind] + ([None] if required else [])


PARAMS = [(method, name) for method in shipped_methods() for name in walked(method)]
WRONG_TYPE_CASES = [(m, n, bad) for m, n in PARAMS for bad in wrong_types(m, n)]
BAD_VALUE_CASES = [(m, n, bad) for m, n in PARAMS for bad in lookup(BAD_VALUES, m, n)]
NUMERIC = [(m, n) for m, n in PARAMS if kind_of(m, n) in ("int", "float")
           and (attnzoo.info(m).params[n] is not None or (m, n) in VALID_NUMBER or n in VALID_NUMBER)]


def test_every_registry_parameter_is_walked():
    for method, name in PARAMS:
        kind_of(method, name)  # a None default needs its kind in OPTIONAL_KINDS
        lookup(BAD_VALUES, method, name)
        if kind_of(method, name) in ("int", "float"):
            assert (method, name) in NUMERIC, f"{method}.{name}: give it a VALID_NUMBER"
    assert len(PARAMS) >= 40 and len(WRONG_TYPE_CASES) > len(PARAMS)


@pytest.mark.parametrize("method", shipped_methods())
def test_the_base_call_runs(method):
    """The walk's calls differ from this one in one parameter only, so their errors are that parameter's."""
    out = first_output(call(method))
    assert out.shape == (1, HEADS, N, D) and torch.isfinite(out).all()


@pytest.mark.parametrize("method, name, bad", WRONG_TYPE_CASES, ids=str)
def test_a_wrong_type_raises_type_error_naming_the_parameter(method, name, bad):
    with pytest.raises(TypeError, match=names(name)):
        call(method, **{name: bad})


@pytest.mark.parametrize("method, name, bad", BAD_VALUE_CASES, ids=str)
def test_an_out_of_range_value_raises_value_error_naming_the_parameter(method, name, bad):
    with pytest.raises(ValueError, match=names(name)):
        call(method, **{name: bad})


@pytest.mark.parametrize("method, name", NUMERIC, ids=str)
def test_numpy_and_0d_tensor_scalars_give_the_python_numbers_output(method, name):
    known = (method, name) in VALID_NUMBER or name in VALID_NUMBER
    value, context = lookup(VALID_NUMBER, method, name) if known else (attnzoo.info(method).params[name], {})
    integer = kind_of(method, name) == "int"
    forms = [np.int64(value), torch.tensor(value)] if integer else [np.float32(value), torch.tensor(value)]
    for form in forms:  # the Python number each form holds (float32 forms round 0.3 to 0.30000001...)
        want = first_output(call(method, **context, **{name: form.item()}))
        got = first_output(call(method, **context, **{name: form}))
        assert torch.equal(got, want), f"{method}.{name}={form!r}"


def test_window_and_block_size_entries_may_be_numpy_integers():
    q, k, v = qkv()
    dense = attnzoo.get("dense")
    assert torch.equal(dense(q, k, v, window_size=(np.int64(4), np.int64(0)), backend="torch"),
                       dense(q, k, v, window_size=(4, 0), backend="torch"))
    xattention = attnzoo.get("xattention", threshold=0.5)
    assert torch.equal(xattention(q, k, v, block_size=(np.int64(16), torch.tensor(32)), stride=8, backend="torch"),
                       xattention(q, k, v, block_size=(16, 32), stride=8, backend="torch"))


# ---------------------------------------------------------------------------------------------------
# Tensor inputs: a non-finite one is refused with its name (before any kernel or SVD runs)
# ---------------------------------------------------------------------------------------------------


def _gates(shape):
    return F.logsigmoid(torch.randn(shape))


FLOAT_INPUTS = {  # (method, input) -> a valid value on the base call's shapes
    ("dense", "bias"): lambda: torch.randn(1, HEADS, N, N),
    ("dense", "sinks"): lambda: torch.randn(HEADS),
    ("gla", "g"): lambda: _gates((1, HEADS, N, D)),
    ("gla", "initial_state"): lambda: torch.randn(1, HEADS, D, D),
    ("flashbias", "bias_factors"): lambda: (torch.randn(1, HEADS, N, 4), torch.randn(1, HEADS, N, 4)),
    ("flashbias", "bias"): lambda: torch.randn(1, HEADS, N, N),
    ("flashbias", "alibi_slopes"): lambda: torch.rand(HEADS),
    ("seerattention", "gate"): lambda: torch.rand(1, HEADS, 2, 2),
    ("lawcat", "g"): lambda: _gates((1, HEADS, N)),
    ("lawcat", "conv_q"): lambda: torch.randn(HEADS, D, 3),
    ("lawcat", "conv_k"): lambda: torch.randn(HEADS, D, 3),
    ("wersa", "gains"): lambda: torch.rand(3) + 0.5,
}
NOT_FLOAT_INPUTS = {("block_sparse", "block_mask"), ("sparsed", "cache")}


def _poisoned(value, bad: float):
    """value with its first entry set to `bad` (the first tensor of a pair)."""
    if isinstance(value, tuple):
        return (_poisoned(value[0], bad),) + value[1:]
    value = value.clone()
    value.view(-1)[0] = bad
    return value


def test_every_tensor_input_is_covered():
    inputs = {(m, name) for m in shipped_methods() for name in attnzoo.info(m).inputs}
    tensor_params = {(m, name) for m, name in PARAMS if kind_of(m, name) == "tensor"}
    assert inputs | tensor_params == set(FLOAT_INPUTS) | NOT_FLOAT_INPUTS


def input_call(method: str, name: str, value):
    """The base call with input `name` = value (flashbias: instead of the base's bias; ALiBi is causal)."""
    extra = {"bias": None, "causal": name == "alibi_slopes"} if method == "flashbias" else {}
    return call(method, **{**extra, name: value})


@pytest.mark.parametrize("method, name", sorted(FLOAT_INPUTS), ids=str)
def test_a_nan_tensor_input_is_refused_with_its_name(method, name):
    value = FLOAT_INPUTS[(method, name)]()
    assert torch.isfinite(first_output(input_call(method, name, value))).all()
    with pytest.raises(ValueError, match=names(name)):
        input_call(method, name, _poisoned(value, NAN))


@pytest.mark.parametrize("method, name", [("dense", "sinks"), ("flashbias", "bias"), ("flashbias", "bias_factors"),
                                          ("flashbias", "alibi_slopes"), ("lawcat", "conv_q"), ("wersa", "gains"),
                                          ("gla", "initial_state")], ids=str)
def test_an_infinite_tensor_input_is_refused_where_inf_has_no_meaning(method, name):
    with pytest.raises(ValueError, match=names(name)):
        input_call(method, name, _poisoned(FLOAT_INPUTS[(method, name)](), INF))


def test_minus_inf_stays_allowed_in_a_dense_bias_and_in_gate_scores():
    bias = torch.zeros(1, HEADS, N, N)
    bias[..., 0] = -INF
    assert torch.isfinite(call("dense", bias=bias)).all()
    gate = torch.rand(1, HEADS, 2, 2)
    gate[..., 0, 1] = -INF
    assert torch.isfinite(call("seerattention", gate=gate)).all()


# ---------------------------------------------------------------------------------------------------
# The cases issue 16 reported
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, kwargs, error, name", [
    ("based", {"use_norm": "no"}, TypeError, "use_norm"),
    ("s2", {"homo_head": "no"}, TypeError, "homo_head"),
    ("dense", {"return_lse": "yes"}, TypeError, "return_lse"),
    ("based", {"eps": -1.0}, ValueError, "eps"),
    ("based", {"eps": NAN}, ValueError, "eps"),
    ("lawcat", {"eps": -1.0}, ValueError, "eps"),
    ("lawcat", {"eps": NAN}, ValueError, "eps"),
    ("wersa", {"seed": 1.5}, TypeError, "seed"),
    ("wersa", {"gains": [1.0, 1.0, 1.0]}, TypeError, "gains"),
    ("wersa", {"bandwidth": INF}, TypeError, "bandwidth"),  # removed: an unknown keyword, named
], ids=str)
def test_issue_16_cases(method, kwargs, error, name):
    with pytest.raises(error, match=names(name)):
        call(method, **kwargs)


def test_a_nan_flashbias_bias_is_refused_naming_bias_before_the_svd(monkeypatch):
    def no_svd(*args, **kwargs):
        raise AssertionError("linalg.svd ran on a NaN bias")

    monkeypatch.setattr(torch.linalg, "svd", no_svd)
    bias = torch.randn(1, HEADS, N, N)
    bias[0, 0, 3, 5] = NAN
    with pytest.raises(ValueError, match=names("bias")):
        call("flashbias", bias=bias)
