"""Every model type of the installed transformers, patched with `dense`: it matches the unpatched eager model
(logits to 1e-5 in fp32 with left and right padding, greedy generation for decoders) or refuses with an error
that names the argument and the model type. Never a silent change.

The model types are those of transformers' causal-LM, seq2seq-LM and masked-LM mappings whose attention goes
through the AttentionInterface, each built from its default config shrunk to a tiny size (hidden 64, 2 layers,
vocab 97, a sliding window of 6 where the config has one, switched on where the default config has it off).
Those that cannot be built tiny or run on CPU are skipped with the reason recorded. `test_representative_models`
runs a few of each kind of attention keyword (fast; one of them also on the Triton interpreter);
`test_every_model_type` (slow) runs them all and checks the table in docs/patching.md.
`python tests/test_hf_models.py` writes that table into docs/patching.md.
"""

from __future__ import annotations

import contextlib
import pathlib
import re
import sys
import warnings
from typing import NamedTuple

import pytest
import torch

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("attnzoo.hf")
from transformers.models.auto import modeling_auto  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
WINDOW = 6  # shorter than the test sequences, so that sliding-window layers cut keys off
LENGTH, PAD = 12, 4  # tokens per row, padding of the padded row
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "patching.md"
MAPPINGS = {
    "causal": modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    "seq2seq": modeling_auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    "masked": modeling_auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES,
}
# the tiny sizes, set where the default config has the attribute (directly or through its attribute_map)
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=128, d_kv=16, d_ff=128, embedding_size=64,
    encoder_layers=2, decoder_layers=2, num_decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
    encoder_ffn_dim=128, decoder_ffn_dim=128, sliding_window=WINDOW, moe_intermediate_size=32, num_experts=4,
    num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=32,
    attn_logit_softcapping=1.0, pad_token_id=0, rotary_dim=8,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=32,  # multi-head latent
    attention_types=[[["global", "local"], 1]], window_size=WINDOW,  # gpt-neo: one global, one local layer
    # windows that the test sequences pass, in configs that switch them off or set them long by default
    use_sliding_window=True, max_window_layers=1,  # qwen2/qwen3 family: windowed from the second layer
    local_attention=WINDOW,  # modernbert: local layers see WINDOW // 2 keys on each side
    attention_chunk_size=WINDOW,  # llama4: chunked attention
    keep_window_size=WINDOW,  # doge: its dynamic mask keeps this many keys
)
SOFTCAP_INIT = 0.2  # the initializer range of models with a softcap: scores large enough for it to bend them
MAX_PARAMETERS = 20_000_000
# a few of each kind: those of issue 12's report, sliding windows (every layer, alternating, through the mask
# alone: phimoe), softcap, position bias, sinks, latent attention, a module that does not say whether it is
# causal (layoutlm), an encoder with local layers (modernbert), an additive mask (doge), recurrent layers that
# read padded positions (recurrent_gemma), and two refusals: at patch time (a sparse index: deepseek_v32) and at
# the first forward (a chunked-attention mask: llama4_text)
REPRESENTATIVE = ["llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "phi3", "gemma", "gemma2", "gemma3_text",
                  "gpt_neox", "gpt2", "olmo2", "starcoder2", "bert", "modernbert", "bart", "t5", "gpt_oss", "phimoe",
                  "deepseek_v3", "layoutlm", "doge", "recurrent_gemma", "deepseek_v32", "llama4_text"]
REFUSED = {"deepseek_v32", "llama4_text"}  # the representative model types that refuse; the others match


class Outcome(NamedTuple):
    status: str  # "matches", "refused" or "skipped"
    reason: str  # the refusal's message, or why the model type was skipped


class Skip(Exception):
    """The model type cannot be built tiny or run on CPU (not a statement about patching)."""


# ---------------------------------------------------------------------------------------------------
# building tiny models


def model_types() -> dict[str, tuple[str, str]]:
    """model type -> (kind, model class name), the first mapping that has it."""
    found = {}
    for kind, mapping in MAPPINGS.items():
        for model_type, class_name in mapping.items():
            found.setdefault(model_type, (kind, class_name if isinstance(class_name, str) else class_name[0]))
    return dict(sorted(found.items()))


def tiny_config(model_type: str, layers: int):
    config_class = transformers.CONFIG_MAPPING[model_type]
    default = config_class()
    parts = set(getattr(default, "sub_configs", None) or ())
    if parts & {"text_config", "text_encoder", "encoder", "encoder_config"}:
        raise Skip(f"built from sub-configs ({', '.join(sorted(parts))}): a multimodal model or an encoder-decoder "
                   "wrapper, whose text model types run on their own")
    sizes = {name: value for name, value in {**TINY, "num_hidden_layers": layers}.items()
             if hasattr(default, name) and not isinstance(getattr(config_class, name, None), property)}
    if getattr(default, "qk_nope_head_dim", None):  # latent attention: rotary on part of a head, no kv-head groups
        sizes.update(head_dim=sizes["qk_rope_head_dim"], num_key_value_heads=sizes["num_attention_heads"])
    config = config_class(**sizes)
    if getattr(config, "attn_logit_softcapping", None):
        config.initializer_range = SOFTCAP_INIT
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and "sliding_attention" in layer_types and "full_attention" in set(
            getattr(default, "layer_types", None) or ()):
        config.layer_types = ["sliding_attention", "full_attention"] * (len(layer_types) // 2)  # local, global, ...
    return config


def build(model_type: str):
    """The tiny eager model: 2 layers, or 4 where 2 hold no attention layer (hybrids with recurrent layers)."""
    kind, class_name = model_types()[model_type]
    model_class = getattr(transformers, class_name, None)
    if model_class is None:
        raise Skip(f"transformers has no {class_name}")
    model = _build(model_type, model_class, layers=2)
    if not hf.attention_layers(model):
        with contextlib.suppress(Skip):
            model = _build(model_type, model_class, layers=4)
    if not hf.attention_layers(model):
        raise Skip("its attention does not go through the AttentionInterface (with 2 or 4 layers)")
    return kind, model


def _build(model_type: str, model_class, layers: int):
    try:
        config = tiny_config(model_type, layers)
        with torch.device("meta"):
            size = sum(p.numel() for p in model_class(config).parameters())
    except Skip:
        raise
    except Exception as e:
        raise Skip(f"cannot be built tiny: {_first_line(e)}") from e
    if size > MAX_PARAMETERS:
        raise Skip(f"cannot be built tiny ({size / 1e6:.0f}M parameters with the tiny sizes)")
    torch.manual_seed(0)
    try:
        model = model_class(config).eval()
        model.set_attn_implementation("eager")
    except Exception as e:
        raise Skip(f"cannot be built tiny: {_first_line(e)}") from e
    return model


def _first_line(error: Exception) -> str:
    text = str(error).strip().split("\n")[0]
    return f"{type(error).__name__}: {text[:160]}"


# ---------------------------------------------------------------------------------------------------
# running them


def batches() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Two rows each: one full, one padded on the named side."""
    torch.manual_seed(1)
    ids = torch.randint(2, VOCAB, (2, LENGTH))
    left, right = torch.ones_like(ids), torch.ones_like(ids)
    left[1, :PAD] = 0
    right[1, LENGTH - PAD:] = 0
    return {"left": (ids, left), "right": (ids, right)}


def outputs(model, kind: str) -> dict[str, torch.Tensor]:
    """What the comparison reads: logits at real tokens for each padding side, and greedy tokens."""
    got = {}
    with torch.no_grad():
        for side, (ids, mask) in batches().items():
            if kind == "seq2seq":  # every decoder token is real
                got[side] = model(input_ids=ids, attention_mask=mask, decoder_input_ids=ids[:, :5]).logits
            else:
                got[side] = model(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        if kind != "masked":
            ids, mask = batches()["left"]
            got["generate"] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                             pad_token_id=0, bos_token_id=1, decoder_start_token_id=1)
    return got


def check(model_type: str, backend: str = "torch") -> Outcome:
    """Patch one tiny model with dense (run by `backend`) and compare it with the unpatched eager model."""
    try:
        kind, model = build(model_type)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            want = outputs(model, kind)
    except Skip as e:
        return Outcome("skipped", str(e))
    except Exception as e:
        return Outcome("skipped", f"does not run tiny on CPU: {_first_line(e)}")
    if not all(torch.isfinite(t.float()).all() for t in want.values()):
        return Outcome("skipped", "not finite in fp32 at the tiny size")
    try:
        hf.patch(model, "dense", backend=backend)
        calls = _count_calls(model)
        got = outputs(model, kind)
    except (NotImplementedError, ValueError) as e:
        return Outcome("refused", _refusal(e, model))
    assert all(calls.values()), f"{model_type}: patched layers never ran: {[w for w, n in calls.items() if not n]}"
    for name, expected in want.items():
        if expected.is_floating_point():
            torch.testing.assert_close(got[name], expected, atol=1e-5 * expected.abs().max().item(), rtol=0,
                                       msg=lambda text: f"{model_type} {name}: {text}")
        else:
            assert torch.equal(got[name], expected), f"{model_type}: greedy tokens differ"
    return Outcome("matches", "")


def _count_calls(model) -> dict[str, int]:
    """Calls per patched layer (its index and class; a decoder-only model's unused cross-attention shares them
    with its self-attention), counted from now on: a match counts only if every one ran."""
    calls = {}

    def count(layer, args, out):
        calls[layer.where] += 1

    for _, module in hf.attention_layers(model):
        calls[module.attnzoo.where] = 0
        module.attnzoo.register_forward_hook(count)
    return calls


def _refusal(error: Exception, model) -> str:
    """The refusal's message, checked to name the model type and the layer (every error patching raises about a
    layer does)."""
    text = str(error)
    model_type = model.config.model_type
    assert re.search(rf"\b{re.escape(model_type)} layer \d+ ", text), \
        f"{model_type} was refused without naming it and the layer: {text}"
    return text.split("\n")[0]


# ---------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("model_type", REPRESENTATIVE)
def test_representative_models(model_type):
    outcome = check(model_type)
    assert outcome.status == ("refused" if model_type in REFUSED else "matches"), outcome.reason


# on the Triton interpreter: sinks and alternating sliding windows (gpt_oss), with both paddings and generate
INTERPRETED = ["gpt_oss"]


@pytest.mark.parametrize("model_type", INTERPRETED)
def test_representative_models_on_the_interpreter(model_type):
    assert check(model_type, backend="triton") == Outcome("matches", "")


@pytest.mark.slow
def test_every_model_type():
    """Every model type matches, refuses or is skipped for a recorded reason; docs/patching.md lists them all
    (checked against the transformers version the table was made with)."""
    results = all_results()
    assert all(results[t].status != "skipped" for t in REPRESENTATIVE)
    documented = DOC.read_text()
    if _TABLE_VERSION.format(version=transformers.__version__) not in documented:
        pytest.skip(f"docs/patching.md's table is for another transformers than {transformers.__version__}")
    assert table(results) in documented, "docs/patching.md is out of date: run python tests/test_hf_models.py"


def all_results() -> dict[str, Outcome]:
    return {model_type: check(model_type) for model_type in model_types()}


_TABLE_VERSION = "<!-- model table: transformers {version} -->"
_TABLE = re.compile(r"<!-- model table: transformers \S+ -->\n<!-- model table -->\n.*?<!-- end model table -->", re.S)


def table(results: dict[str, Outcome]) -> str:
    """The markdown table of docs/patching.md: matches and refusals first, then the skipped model types."""
    order = sorted(results, key=lambda t: (results[t].status == "skipped", t))
    counts = ", ".join(f"{sum(o.status == s for o in results.values())} {s}" for s in ("matches", "refused", "skipped"))
    rows = [f"| `{t}` | {results[t].status} | {_cell(results[t].reason)} |" for t in order]
    return "\n".join([f"{len(results)} model types: {counts}.", "", "| model type | with `dense` | reason |",
                      "|---|---|---|", *rows])


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def write_table(results: dict[str, Outcome]) -> None:
    block = f"{_TABLE_VERSION.format(version=transformers.__version__)}\n<!-- model table -->\n{table(results)}\n" \
            "<!-- end model table -->"
    text = DOC.read_text()
    if not _TABLE.search(text):
        sys.exit(f"{DOC} has no model table markers")
    DOC.write_text(_TABLE.sub(lambda _: block, text))


if __name__ == "__main__":
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    write_table(all_results())
