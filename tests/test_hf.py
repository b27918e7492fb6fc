"""attnzoo.hf: patching tiny random transformers models (built from configs, no downloads) on CPU.

Methods run with backend="torch" (the Triton interpreter is too slow for whole models) except in
the one test that checks the kernel path.
"""

import pytest
import torch
import torch.nn.functional as F

import attnzoo

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("attnzoo.hf")
pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97
TORCH = {"backend": "torch"}


@pytest.fixture
def register(monkeypatch):
    """attnzoo.register for one test: the method (and any adapter) is gone afterwards, so that tests
    elsewhere that walk the registry never see it."""
    from attnzoo.registry import REGISTRY

    monkeypatch.setattr(hf, "_ADAPTERS", {})

    def add(name, fn, **kwargs):
        monkeypatch.setitem(REGISTRY._entries(), name, None)
        monkeypatch.setitem(REGISTRY._functions, name, fn)
        kwargs.setdefault("family", "exact")
        kwargs.setdefault("supports", {"dtypes": ["float32"]})
        attnzoo.register(name, fn, overwrite=True, **kwargs)
        return name

    return add


def method_or_skip(name: str) -> str:
    """Skip unless `name` is registered and its module imports (methods land in parallel)."""
    if name not in attnzoo.list_methods():
        pytest.skip(f"method {name!r} is not in the registry yet")
    try:
        attnzoo.get(name)
    except ImportError as e:
        pytest.skip(f"method {name!r} does not import yet: {e}")
    return name


def llama(eager: bool = False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        attn_implementation="eager" if eager else "sdpa",
    )
    return transformers.LlamaForCausalLM(config).eval()


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64,
    )
    model = transformers.BertModel(config).eval()
    if not hf.attention_layers(model):
        pytest.skip(f"BERT does not use the AttentionInterface in transformers {transformers.__version__}")
    return model


def run(model, ids, mask=None):
    """Logits (or last hidden states). Position ids count real tokens only, as generate() does, so that a
    padded row sees the same positions as the sequence alone."""
    positions = None if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tokens(batch: int, length: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (batch, length))


def assert_close(got, want, rel=1e-5):
    torch.testing.assert_close(got, want, atol=rel * want.abs().max().item(), rtol=0)


MODELS = {"llama": llama, "llama-eager": lambda: llama(eager=True), "bert": bert}


# ---------------------------------------------------------------------------------------------------
# exact methods reproduce the model


@pytest.mark.parametrize("name", MODELS)
def test_dense_equals_unpatched(name):
    model = MODELS[name]()
    ids = tokens(2, 24)
    want = run(model, ids)
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        got = run(model, ids)
    assert_close(got, want)


def test_dense_kernel_path_equals_unpatched():
    """backend="auto" runs the Triton kernel (interpreted on CPU under the test harness)."""
    model = bert()
    ids = tokens(1, 20)
    want = run(model, ids)
    with hf.patched(model, method_or_skip("dense")):
        got = run(model, ids)
    assert_close(got, want)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_xattention_threshold_one_equals_unpatched(name):
    model = MODELS[name]()
    ids = tokens(2, 40)
    want = run(model, ids)
    with hf.patched(model, method_or_skip("xattention"), threshold=1.0, block_size=16, stride=4, **TORCH):
        got = run(model, ids)
    assert_close(got, want)


def test_patched_path_is_taken(register):
    """Guard against a patch that silently leaves the original attention running."""
    calls = []

    def zero(q, k, v, *, causal, scale, backend):
        calls.append((q.shape[2], k.shape[2], causal))
        return torch.zeros_like(q)

    register("test_hf_zero", zero)
    model = llama()
    ids = tokens(1, 9)
    want = run(model, ids)
    with hf.patched(model, "test_hf_zero"):
        got = run(model, ids)
    assert calls == [(9, 9, True)] * 2
    assert (got - want).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------
# padding


@pytest.mark.parametrize("name,side", [("llama", "left"), ("llama", "right"), ("llama-eager", "left"),
                                       ("bert", "right")])
def test_padded_row_equals_sequence_alone(name, side):
    model = MODELS[name]()
    ids, pad, length = tokens(3, 20), 7, 13
    mask = torch.ones_like(ids)
    real = slice(pad, None) if side == "left" else slice(None, length)
    mask[1] = 0
    mask[1, real] = 1
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        batch = run(model, ids, mask)
        alone = run(model, ids[1:2, real])
        full = run(model, ids[2:3])
    assert_close(batch[1, real], alone[0])
    assert_close(batch[2], full[0])  # unpadded rows of a padded batch are untouched


def test_padding_matches_unpatched_model():
    model = llama()
    ids = tokens(2, 16)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    want = run(model, ids, mask)
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        got = run(model, ids, mask)
    assert_close(got[0, 5:], want[0, 5:])
    assert_close(got[1], want[1])


def test_non_padding_mask_is_refused():
    """A 4D mask that is neither padding nor a window band (here: two packed sequences) raises, never reduced."""
    model = llama()
    ids = tokens(1, 8)
    packed = torch.zeros(8, 8, dtype=torch.bool)
    packed[:4, :4] = packed[4:, 4:] = True
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        with pytest.raises(NotImplementedError, match="llama layer 0 .*not a padding mask"):
            model(input_ids=ids, attention_mask=(packed & torch.ones(8, 8, dtype=torch.bool).tril())[None, None])


def test_window_band_mask_is_honoured():
    """A 4D mask that draws a sliding window (a model that windows through its mask alone) runs as that window."""
    model = llama()
    ids = tokens(1, 8)
    band = (torch.ones(8, 8, dtype=torch.bool).tril() & ~torch.ones(8, 8, dtype=torch.bool).tril(-3))[None, None]
    want = model(input_ids=ids, attention_mask=band).logits
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        assert_close(model(input_ids=ids, attention_mask=band).logits, want)
    assert hf.mask_geometry(band, 8, 8, causal=True) == (None, True, (2, -1))
    assert hf.mask_geometry(band.tril(1) | band.transpose(-1, -2), 8, 8, causal=True) == (None, False, (2, 2))


def test_additive_mask_runs_as_dense_bias():
    """An eager-style float mask with values besides 0 and dtype-min (Doge's dynamic mask, a user's ALiBi) is
    added to the scores by eager attention: dense takes it as its bias; methods without one refuse it."""
    model = llama(eager=True)
    ids = tokens(2, 10)
    distance = torch.arange(10)[:, None] - torch.arange(10)[None, :]
    additive = torch.where(distance >= 0, -0.3 * distance.float(), torch.finfo(torch.float32).min)
    additive = additive.expand(2, 1, 10, 10).clone()
    additive[1, ..., :3] = torch.finfo(torch.float32).min  # and left padding
    want = model(input_ids=ids, attention_mask=additive).logits
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        assert_close(model(input_ids=ids, attention_mask=additive).logits[:, 3:], want[:, 3:])
    with hf.patched(model, method_or_skip("xattention"), **TORCH):
        with pytest.raises(NotImplementedError, match="llama layer 0 .*additive attention_mask.*patch with 'dense'"):
            model(input_ids=ids, attention_mask=additive)


def test_key_validity():
    causal = torch.ones(4, 6, dtype=torch.bool).tril(2)
    assert hf.key_validity(None, 4, 6, causal=True) is None
    assert hf.key_validity(causal[None, None], 4, 6, causal=True) is None
    padded = causal.clone()
    padded[:, :2] = False
    valid = hf.key_validity(padded[None, None], 4, 6, causal=True)
    assert valid.tolist() == [[False, False, True, True, True, True]]
    additive = torch.where(padded, 0.0, torch.finfo(torch.float32).min)
    assert torch.equal(hf.key_validity(additive[None, None], 4, 6, causal=True), valid)
    with pytest.raises(NotImplementedError, match="additive bias"):
        hf.key_validity(additive[None, None] + 0.5, 4, 6, causal=True)
    with pytest.raises(NotImplementedError, match="not a padding mask"):
        hf.key_validity(causal[None, None], 4, 6, causal=False)


# ---------------------------------------------------------------------------------------------------
# decoding


def greedy(model, ids, mask, **kwargs):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                          pad_token_id=0, **kwargs)[:, ids.shape[1]:]


def test_generate_with_dense_matches_unpatched():
    model = llama()
    ids = tokens(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want = greedy(model, ids, mask)
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        got = greedy(model, ids, mask)
    assert torch.equal(got, want)


def _decode_logits(model, ids, mask, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                         output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoding_logits_with_dense_match_unpatched(cache):
    """Every decoding step's logits, with a left-padded row, for the default cache and for a
    pre-allocated static cache (whose unused slots reach the attention function masked)."""
    model = llama()
    ids = tokens(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    kwargs = {} if cache == "dynamic" else {"cache_implementation": "static"}
    want_ids, want_logits = _decode_logits(model, ids, mask, **kwargs)
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        got_ids, got_logits = _decode_logits(model, ids, mask, **kwargs)
    assert torch.equal(got_ids, want_ids)
    assert_close(got_logits, want_logits)


@pytest.mark.parametrize("method,params", [("gla", {}), ("lawcat", {}),
                                           ("seerattention", {"topk_ratio": 0.5, "block_size": 16})])
def test_generate_cache_equals_recompute(method, params):
    """Linear methods decode over the KV cache by recomputing with the queries they kept, sparse ones fall
    back to dense for one query: the tokens must be those of running the whole sequence at every step."""
    model = llama()
    ids = tokens(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with hf.patched(model, method_or_skip(method), **params, **TORCH):
        cached = greedy(model, ids, mask)
        uncached = greedy(model, ids, mask, use_cache=False)
    assert torch.equal(cached, uncached)


def test_decoding_without_kept_queries_raises():
    model = llama()
    ids = tokens(1, 6)
    cache = model(input_ids=ids, use_cache=True).past_key_values  # built by sdpa, not the patched method
    with hf.patched(model, method_or_skip("gla"), **TORCH):
        with pytest.raises(RuntimeError, match="cached tokens"):
            model(input_ids=tokens(1, 1), past_key_values=cache)


def test_decoding_after_an_unrelated_forward_raises_instead_of_reusing_its_queries():
    model = llama()
    prompt, other, new = tokens(1, 8), tokens(1, 8), tokens(1, 1)
    with torch.no_grad(), hf.patched(model, method_or_skip("gla"), **TORCH):
        want = model(torch.cat([prompt, new], 1), use_cache=False).logits[:, -1]
        cache = model(prompt, use_cache=True).past_key_values
        assert_close(model(new, past_key_values=cache).logits[:, -1], want)
        cache = model(prompt, use_cache=True).past_key_values
        model(other, use_cache=False)  # same length, other text: the layer now holds its queries
        with pytest.raises(RuntimeError, match="another sequence"):
            model(new, past_key_values=cache)


# ---------------------------------------------------------------------------------------------------
# learned parts (linear methods)


@pytest.mark.parametrize("name,method,part", [("llama", "gla", "GLAGate"), ("llama", "lawcat", "LAWCATAdapter"),
                                              ("bert", "wersa", "WERSAGates"), ("bert", "based", None)])
def test_linear_method_learned_parts_train(name, method, part):
    model = MODELS[name]()
    hf.patch(model, method_or_skip(method), **TORCH)
    params = hf.trainable_parameters(model)
    adapters = {type(m.attnzoo.adapter).__name__ for _, m in hf.attention_layers(model)}
    assert adapters == ({part} if part else {"NoneType"})
    assert bool(params) == bool(part) and all(p.grad is None for p in params)
    ids = tokens(2, 12)
    logits = run(model, ids)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
    assert all(p.grad.abs().sum() > 0 for p in params if p.numel() > 1 or p.shape == ())
    hf.unpatch(model)
    assert hf.trainable_parameters(model) == []


def test_linear_method_padding():
    model = llama()
    ids = tokens(2, 12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with hf.patched(model, method_or_skip("gla"), **TORCH):
        batch = run(model, ids, mask)
        alone = run(model, ids[:1, 4:])
    assert_close(batch[0, 4:], alone[0])


def test_known_adapter_missing_class_is_named(monkeypatch):
    monkeypatch.setitem(hf._KNOWN_ADAPTERS, "test_hf_nogate",
                        ("attnzoo.methods.dense", "NoSuchGate", None, None))
    with pytest.raises(NotImplementedError, match="attnzoo.methods.dense.NoSuchGate"):
        hf.adapter_for("test_hf_nogate")


def test_registered_adapter_feeds_the_method(register):
    """register_adapter: a third-party method gets a learned part built per layer and its inputs per call."""
    seen = []

    def scaled(q, k, v, *, causal, scale, backend, temperature=None):
        seen.append(temperature.shape)
        n, m = q.shape[2], k.shape[2]
        mask = torch.ones(n, m, dtype=torch.bool).tril(m - n)
        return F.scaled_dot_product_attention(q * temperature, k, v, attn_mask=mask, scale=scale, enable_gqa=True)

    register("test_hf_temp", scaled, inputs=["temperature"], supports={"dtypes": ["float32"], "backward": True})
    hf.register_adapter("test_hf_temp", lambda shape, params: torch.nn.Linear(shape.hidden_size, shape.num_heads),
                        lambda lin, x: {"temperature": 1 + lin(x.hidden).transpose(1, 2)[..., None]},
                        overwrite=True)
    model = llama()
    hf.patch(model, "test_hf_temp", layers=[1])
    run(model, tokens(2, 7)).sum().backward()
    assert seen == [(2, 4, 7, 1)]
    (lin,) = {m.attnzoo.adapter for _, m in hf.attention_layers(model) if hasattr(m, "attnzoo")}
    assert [p.grad is not None for p in hf.trainable_parameters(model)] == [True, True]
    assert set(map(id, hf.trainable_parameters(model))) == set(map(id, lin.parameters()))
    with pytest.raises(ValueError, match="already has an adapter"):
        hf.register_adapter("test_hf_temp", lambda s, p: None, lambda a, x: {})
    hf.unpatch(model)


@pytest.mark.parametrize("gqa", [True, False])
def test_adapter_without_gqa_gets_kv_heads_repeated(register, gqa):
    seen = []

    def heads(q, k, v, *, causal, scale, backend, part=None):
        seen.append((k.shape[1], part))
        return torch.zeros_like(q)

    register("test_hf_heads", heads, inputs=["part"], supports={"dtypes": ["float32"], "gqa": True})
    hf.register_adapter("test_hf_heads", lambda shape, params: torch.nn.Linear(1, shape.num_kv_heads),
                        lambda lin, x: {"part": lin.out_features}, gqa=gqa, overwrite=True)
    model = llama()  # 4 query heads, 2 kv heads
    with hf.patched(model, "test_hf_heads", layers=[0]):
        run(model, tokens(1, 5))
    assert seen == [(2, 2)] if gqa else [(4, 4)]


# ---------------------------------------------------------------------------------------------------
# layers, unpatch, errors


def test_layers_patches_only_those(register):
    model = llama()
    ids = tokens(1, 9)
    hf.patch(model, method_or_skip("dense"), layers=[1], **TORCH)
    layers = dict(hf.attention_layers(model))
    assert not hasattr(layers[0], "attnzoo") and hasattr(layers[1], "attnzoo")
    hf.unpatch(model)

    calls = []

    def counting(q, k, v, *, causal, scale, backend):
        calls.append(1)
        return torch.zeros_like(q)

    register("test_hf_count", counting)
    hf.patch(model, "test_hf_count", layers=range(1, 2))
    run(model, ids)
    assert calls == [1]


def test_unpatch_restores_everything():
    model = llama()
    ids = tokens(2, 8)
    want = run(model, ids)
    modules_before = {name for name, _ in model.named_modules()}
    hf.patch(model, method_or_skip("gla"), **TORCH)
    assert model.config._attn_implementation == "attnzoo"
    hf.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert {name for name, _ in model.named_modules()} == modules_before
    assert all(not m._forward_pre_hooks for _, m in hf.attention_layers(model))
    assert torch.equal(run(model, ids), want)
    with pytest.raises(ValueError, match="not patched"):
        hf.unpatch(model)


def test_patched_context_unpatches_on_error():
    model = llama(eager=True)
    with pytest.raises(KeyError):
        with hf.patched(model, method_or_skip("dense")):
            assert model.config._attn_implementation == "attnzoo_eager"
            raise KeyError("boom")
    assert model.config._attn_implementation == "eager"


def test_usage_errors():
    model = llama()
    with pytest.raises(ValueError, match="'nope' is not an attnzoo method; known methods: .*dense"):
        hf.patch(model, "nope")
    with pytest.raises(TypeError, match="method must be a str"):
        hf.patch(model, None)
    with pytest.raises(TypeError, match="unknown parameter"):
        hf.patch(model, "dense", thresold=0.5)
    with pytest.raises(ValueError, match=r"layers \[2, 7\] out of range.*0\.\.1"):
        hf.patch(model, "dense", layers=[0, 2, 7])
    with pytest.raises(TypeError, match="layers must"):
        hf.patch(model, "dense", layers=1)
    assert model.config._attn_implementation == "sdpa"  # failed calls leave the model untouched
    hf.patch(model, "dense", **TORCH)
    with pytest.raises(ValueError, match="already patched"):
        hf.patch(model, "dense")
    hf.unpatch(model)


def test_transformers_version_check():
    for ok in ("4.51.3", "4.57.0", "5.0.0rc1", transformers.__version__):
        hf.check_transformers_version(ok)
    with pytest.raises(ImportError, match="transformers >= 4.51.*found 4.50.3"):
        hf.check_transformers_version("4.50.3")


def test_refuses_what_the_method_cannot_do(register):
    model = llama()
    with pytest.raises(ValueError, match="non-causal only"):
        register("test_hf_bidir", lambda q, k, v, **kw: q, supports={"causal": False})
        hf.patch(model, "test_hf_bidir")
    encoder = bert()
    with pytest.raises(ValueError, match="causal only, but .* is not causal"):
        register("test_hf_causal_only", lambda q, k, v, **kw: q, supports={"non_causal": False})
        hf.patch(encoder, "test_hf_causal_only")
    assert not hasattr(encoder, hf._MARK)
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="'sdpa' or 'eager'"):
        hf.patch(model, "dense")
    model = llama().train()
    for _, module in hf.attention_layers(model):
        module.attention_dropout = 0.1  # active in training mode
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        with pytest.raises(ValueError, match="dropout"):
            run(model, tokens(1, 5))


def test_public_exports():
    if not hasattr(attnzoo, "patch"):
        pytest.skip("attnzoo/__init__.py does not export patch/unpatch/patched yet")
    assert (attnzoo.patch, attnzoo.unpatch, attnzoo.patched) == (hf.patch, hf.unpatch, hf.patched)


# ---------------------------------------------------------------------------------------------------
# sliding windows and softcap


def windowed(name: str, layer_types=("sliding_attention", "full_attention")):
    """Tiny models whose window (5) the test sequences pass: every layer (mistral), local/global layers with
    softcap (gemma2), local/global layers (gemma3_text, qwen2 with sliding window from its second layer)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, sliding_window=5, pad_token_id=0, attn_implementation="eager")
    if name == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common)).eval()
    if name == "qwen2":
        config = transformers.Qwen2Config(**common, use_sliding_window=True, max_window_layers=1)
        return transformers.Qwen2ForCausalLM(config).eval()
    layers = dict(layer_types=list(layer_types))
    if name == "gemma2":
        config = transformers.Gemma2Config(**common, **layers, attn_logit_softcapping=1.0, initializer_range=0.2)
        return transformers.Gemma2ForCausalLM(config).eval()
    return transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**common, **layers)).eval()


WINDOWED = ["mistral", "gemma2", "gemma3_text", "qwen2"]


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("name", WINDOWED)
def test_windowed_model_decoding_matches_unpatched(name, cache):
    """Prompt and every decoding step past the window, through the KV cache, with a left-padded row."""
    model = windowed(name)
    if name == "qwen2":
        windows = [getattr(m, "sliding_window", None) for _, m in hf.attention_layers(model)]
        assert windows == [None, 5], "the test wants one global and one windowed layer"
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    kwargs = {} if cache == "dynamic" else {"cache_implementation": "static"}
    want_ids, want_logits = _decode_logits(model, ids, mask, **kwargs)
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        got_ids, got_logits = _decode_logits(model, ids, mask, **kwargs)
    assert torch.equal(got_ids, want_ids)
    assert_close(got_logits, want_logits)


def test_windows_and_softcap_reach_dense_per_layer(register):
    seen = []

    def spy(q, k, v, *, causal, scale, backend, window_size=(-1, -1), softcap=0.0):
        seen.append((tuple(window_size), softcap))
        return attnzoo.get("dense")(q, k, v, causal=causal, scale=scale, window_size=window_size, softcap=softcap)

    register("test_hf_spy", spy, params={"window_size": [-1, -1], "softcap": 0.0})
    model = windowed("gemma2")
    with hf.patched(model, "test_hf_spy"):
        run(model, tokens(1, 9))
    assert seen == [((4, 4), 1.0), ((-1, -1), 1.0)]  # transformers' window 5: the query and 4 keys before it


def test_bound_window_intersects_the_models():
    model = windowed("mistral")
    narrower = windowed("mistral")
    narrower.config.sliding_window = 3  # the same weights, a window of 3 (the query and 2 keys before it)
    ids = tokens(1, 9)
    want = run(narrower, ids)
    with hf.patched(model, method_or_skip("dense"), window_size=(2, 0), **TORCH):
        assert_close(run(model, ids), want)


def test_bound_softcap_conflicting_with_the_models_raises():
    model = windowed("gemma2")
    with hf.patched(model, method_or_skip("dense"), softcap=30.0, **TORCH):
        with pytest.raises(ValueError, match="softcap=30.0 was bound.*gemma2 layer 0.*softcap 1.0"):
            run(model, tokens(1, 9))


@pytest.fixture
def spy(monkeypatch):
    """watch(name): from now on, record (method, queries, window_size, softcap) of every call registry method `name`
    gets (patch() and the single-query dense fallback look methods up in the registry). Returns (watch, calls)."""
    from attnzoo.registry import REGISTRY

    calls = []

    def watch(name):
        fn = REGISTRY.function(name)

        def spied(q, k, v, **kwargs):
            calls.append((name, q.shape[2], tuple(kwargs["window_size"]), kwargs["softcap"]))
            return fn(q, k, v, **kwargs)

        monkeypatch.setitem(REGISTRY._functions, name, spied)

    return watch, calls


# Causal sparse methods with parameters that keep every block a query may see (16-token blocks: a 20-token prompt
# spans two, and the windowed models' window of 5 crosses the block boundary, so it cuts into the chosen blocks).
# block_sparse's mask is one 32-token block, so that it fits every call of a generation up to 32 tokens.
KEEP_EVERY_BLOCK = {
    "xattention": dict(threshold=1.0, block_size=16, stride=4),
    "seerattention": dict(topk_ratio=1.0, block_size=16),
    "s2": dict(block_size=16, local_blocks=2, vert_stride=4),
    "block_sparse": dict(block_size=32, block_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool)),
}
# each layer's (window_size, softcap) as the method must get it: transformers' window 5 is the query and 4 keys
LAYER_OPTIONS = {"mistral": [((4, 4), 0.0), ((4, 4), 0.0)], "gemma2": [((4, 4), 1.0), ((-1, -1), 1.0)]}
SPARSE_WINDOW_CASES = [(name, method, "torch") for name in LAYER_OPTIONS for method in KEEP_EVERY_BLOCK] + [
    ("gemma2", "xattention", "triton"),  # on the Triton interpreter: window, softcap, padding, KV cache
]


@pytest.mark.parametrize("name,method,backend", SPARSE_WINDOW_CASES)
def test_sparse_method_takes_each_layers_window_and_softcap(spy, name, method, backend):
    """A sparse method patched into a windowed model (every layer: mistral; local/global layers with softcap:
    gemma2) gets each layer's window and softcap on its prompt calls, the decoding steps' dense fallback gets
    them too, and, keeping every block, it generates through the KV cache what it generates without a cache, with
    every step's logits those of the unpatched model."""
    watch, calls = spy
    model = windowed(name)
    ids = tokens(2, 20)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    want_ids, want_logits = _decode_logits(model, ids, mask)
    watch(method_or_skip(method))
    watch("dense")
    with hf.patched(model, method, **KEEP_EVERY_BLOCK[method], backend=backend):
        run(model, ids[:1])
        assert calls == [(method, 20, *options) for options in LAYER_OPTIONS[name]]  # (a), layer by layer
        calls.clear()
        got_ids, got_logits = _decode_logits(model, ids, mask)
        uncached = greedy(model, ids, mask, use_cache=False)
    seen = {(fn, n == 1, *options) for fn, n, *options in calls}
    assert seen == {(fn, one, *options) for fn, one in [(method, False), ("dense", True)]
                    for options in LAYER_OPTIONS[name]}  # (a): prompt calls and decoding steps alike
    assert torch.equal(uncached, got_ids)  # (b)
    assert torch.equal(got_ids, want_ids)  # (c)
    assert_close(got_logits, want_logits)


def modernbert():
    """A tiny ModernBERT encoder: a local layer (local_attention 6: 3 keys on each side) and a global one."""
    torch.manual_seed(0)
    config = transformers.ModernBertConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        local_attention=6, layer_types=["sliding_attention", "full_attention"], pad_token_id=0,
        attn_implementation="eager",
    )
    return transformers.ModernBertForMaskedLM(config).eval()


@pytest.mark.parametrize("method,params", [("sparsed", dict(select=1.0, block_size=16)),
                                           ("xattention", dict(threshold=1.0, block_size=16, stride=4))])
def test_sparse_method_takes_an_encoders_window(spy, method, params):
    """A non-causal sparse method (SparseD is non-causal only) in an encoder with local and global layers gets each
    layer's bidirectional window, and, keeping every block, matches the unpatched model with right padding."""
    watch, calls = spy
    model = modernbert()
    ids = tokens(2, 20)
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0
    want = run(model, ids, mask)
    watch(method_or_skip(method))
    with hf.patched(model, method, **params, **TORCH):
        got = run(model, ids, mask)
    assert calls == [(method, n, window, 0.0) for window in [(3, 3), (-1, -1)] for n in (20, 15)]
    real = mask.bool()
    assert_close(got[real], want[real])


@pytest.mark.parametrize("name,keyword", [("mistral", "sliding_window"), ("gemma2", "softcap")])
def test_method_without_window_or_softcap_refuses_at_patch_time(name, keyword):
    model = windowed(name, layer_types=["full_attention"] * 2)
    if "window_size" in attnzoo.info(method_or_skip("based")).params:
        pytest.skip("based takes window_size now")
    refusal = f"{name} layer 0 .* passes {keyword} .*'based' has no '(window_size|softcap)'.*patch with 'block_sparse'"
    with pytest.raises(NotImplementedError, match=refusal):
        hf.patch(model, "based", **TORCH)
    assert not hasattr(model, hf._MARK)


def test_padding_inside_a_window_is_refused():
    """A right-padded prompt followed by generated tokens has padding between its tokens: compacting them
    would shift the window, so it raises."""
    model = windowed("mistral")
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        with pytest.raises(NotImplementedError, match="mistral layer 0 .*padding between its tokens"):
            greedy(model, ids, mask)


# ---------------------------------------------------------------------------------------------------
# the attention function's keywords: honoured, bookkeeping, or refused


def test_call_options_sorts_every_keyword():
    dense = attnzoo.get(method_or_skip("dense"))
    where = "toy layer 3 (ToyAttention)"
    ignored = {name: object() for name in hf.BOOKKEEPING - {hf.PACKED_BY_POSITIONS}}
    off = {"dropout": 0.0, "output_attentions": False, "cu_seq_lens_q": None, "sliding_window": None, "softcap": None,
           "position_ids": None}
    assert hf.call_options(dense, {**ignored, **off}, where) == {}
    positions = torch.arange(4)[None]  # passed on: restarting positions mark a packed batch (docs/varlen.md)
    assert hf.call_options(dense, {"position_ids": positions}, where) == {"position_ids": positions}
    honoured = hf.call_options(dense, {"sliding_window": 4, "softcap": 30}, where)
    assert honoured == {"window_size": (3, 3), "softcap": 30.0}
    with pytest.raises(NotImplementedError, match=r"toy layer 3 \(ToyAttention\) passes frobnicate=2 .*does not know"):
        hf.call_options(dense, {"frobnicate": 2}, where)
    with pytest.raises(NotImplementedError, match="frobnicate"):
        hf.call_options(dense, {"frobnicate": None}, where)  # unknown is refused whatever its value
    for name, value in [("output_attentions", True), ("dropout", 0.1)]:
        with pytest.raises(ValueError, match=f"toy layer 3 .*passes {name}="):
            hf.call_options(dense, {name: value}, where)
    packed = hf.call_options(dense, {"cu_seq_lens_q": torch.tensor([0, 4]), "max_length_q": 4}, where)
    assert packed["cu_seqlens_q"].dtype == torch.int32 and packed["cu_seqlens_q"].tolist() == [0, 4]
    assert packed["max_seqlen_q"] == 4 and set(packed) == {"cu_seqlens_q", "max_seqlen_q"}


class ToyAttention(torch.nn.Module):
    """An attention module as transformers writes them; only its source matters here."""

    def __init__(self, window, config_cap):
        super().__init__()
        self.sliding_window, self.config = window, type("Config", (), {"softcap": config_cap})()

    def forward(self, q, k, v, mask, attention_interface, position_bias=None, **kwargs):
        return attention_interface(self, q, k, v, mask, scaling=1.0, dropout=0.0 if not self.training else 0.1,
                                   sliding_window=self.sliding_window, softcap=getattr(self.config, "softcap", None),
                                   position_bias=position_bias, **kwargs)


def test_declared_keywords_are_checked_at_patch_time():
    declared = hf._declared_keywords(ToyAttention)
    assert set(declared) == {"scaling", "dropout", "sliding_window", "softcap", "position_bias"}
    module = ToyAttention(window=None, config_cap=None)
    assert [hf._static_value(declared[name], module) for name in ("sliding_window", "softcap", "scaling")] == \
        [None, None, 1.0]
    assert hf._static_value(declared["position_bias"], module) is hf.AT_FORWARD
    xattention = attnzoo.get(method_or_skip("xattention"))
    with pytest.raises(NotImplementedError, match="toy layer 0 passes position_bias .*'xattention' has no 'bias'"):
        hf.check_declared_keywords(xattention, module, "toy layer 0")
    with pytest.raises(NotImplementedError, match="toy layer 0 passes sliding_window .*'based' has no 'window_size'"):
        hf.check_declared_keywords(attnzoo.get("based"), ToyAttention(window=8, config_cap=None), "toy layer 0")
    hf.check_declared_keywords(attnzoo.get("dense"), ToyAttention(window=8, config_cap=30.0), "toy layer 0")


def test_output_attentions_is_refused_at_forward():
    model = llama()
    with hf.patched(model, method_or_skip("dense"), **TORCH):
        run(model, tokens(1, 5))  # output_attentions=False arrives and is ignored
        with pytest.raises(ValueError, match="llama layer 0 .*output_attentions=True.*no attention weights"):
            model(input_ids=tokens(1, 5), output_attentions=True)


def t5_and_inputs():
    """The model and inputs of issue 12's T5 report."""
    config = transformers.T5Config(vocab_size=97, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).eval()
    model.set_attn_implementation("eager")
    return model, torch.randint(2, 97, (1, 12)), torch.randint(2, 97, (1, 5))


def test_t5_position_bias_is_honoured_or_refused():
    model, x, d = t5_and_inputs()
    want = model(input_ids=x, decoder_input_ids=d).logits
    if "bias" not in attnzoo.info("dense").inputs:
        with pytest.raises(NotImplementedError, match="t5 layer 0 .*position_bias.*'dense' has no 'bias'"):
            hf.patch(model, "dense")
        return
    with hf.patched(model, "dense"):  # as the issue ran it: the default backend (the kernel, interpreted here)
        got = model(input_ids=x, decoder_input_ids=d).logits
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5
        with pytest.raises(NotImplementedError, match="t5 layer 0 .*position_bias.*patch with 'dense'"):
            hf.patch(t5_and_inputs()[0], method_or_skip("xattention"))


def test_gpt_oss_sinks_are_honoured_or_refused():
    if not hasattr(transformers, "GptOssForCausalLM"):
        pytest.skip(f"transformers {transformers.__version__} has no gpt-oss")
    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=5, pad_token_id=0)
    model = transformers.GptOssForCausalLM(config).eval()
    model.set_attn_implementation("eager")
    for _, module in hf.attention_layers(model):
        torch.nn.init.normal_(module.sinks, std=2.0)  # sinks that take a visible share of each row
    ids = tokens(2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    if "sinks" not in attnzoo.info("dense").inputs:
        with pytest.raises(NotImplementedError, match="gpt_oss layer 0 .*s_aux.*'dense' has no 'sinks'"):
            hf.patch(model, "dense")
        return
    want_ids, want_logits = _decode_logits(model, ids, mask)
    with hf.patched(model, "dense", **TORCH):
        got_ids, got_logits = _decode_logits(model, ids, mask)
    assert torch.equal(got_ids, want_ids)
    assert_close(got_logits, want_logits)


# ---------------------------------------------------------------------------------------------------
# autocast (tests/test_hf_autocast.py runs it on the torch backend)


def test_patched_attention_follows_autocast_on_the_interpreter():
    """Under torch.autocast, each patched layer's attention output comes in the autocast dtype, as SDPA's does,
    and the model's logits stay close to the unpatched model's under autocast."""
    model = llama()
    ids = tokens(2, 12)
    dtypes = []
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        want = run(model, ids)
        sdpa_dtype = F.scaled_dot_product_attention(*torch.randn(3, 1, 1, 4, 16)).dtype
        with hf.patched(model, "dense", backend="triton"):
            for _, module in hf.attention_layers(model):
                module.attnzoo.register_forward_hook(lambda layer, args, out: dtypes.append(out.dtype))
            got = run(model, ids)
    assert dtypes == [sdpa_dtype] * 2 and sdpa_dtype == torch.bfloat16
    assert got.dtype == want.dtype
    assert_close(got.float(), want.float(), rel=3e-2)


# ---------------------------------------------------------------------------------------------------
# registry defaults

# Methods whose required input no model has: patch() takes it bound, and without it the first forward raises naming
# the input. What the test binds fits every call of its models: one block of 128 keys, one ALiBi slope per head.
NEEDS_AN_INPUT = {
    "block_sparse": ("block_mask", lambda: {"block_mask": torch.ones(1, 1, 1, 1, dtype=torch.bool)}),
    "flashbias": ("bias", lambda: {"alibi_slopes": torch.rand(4)}),
}
# seconds per forward under the Triton interpreter even at these sizes: patched on the torch backend only here
# (their kernels are tested on the interpreter directly; xattention's patched path in the window test above)
SLOW_INTERPRETED = {"based", "wersa", "sparsed", "lawcat", "xattention"}
METHODS = [name for name in attnzoo.list_methods() if not name.startswith("test_")]
DEFAULTS_CASES = [(name, "torch") for name in METHODS] + [(name, "triton") for name in METHODS
                                                           if name not in SLOW_INTERPRETED]


@pytest.mark.parametrize("method,backend", DEFAULTS_CASES)
def test_every_method_patches_with_its_defaults(method, backend):
    """patch(model, name) with registry defaults only (a causal model where the method is causal, else an encoder)
    runs and gives finite logits; a method that needs an input refuses naming it, and runs once it is bound."""
    info = attnzoo.info(method_or_skip(method))
    model = llama() if info.supports.causal else bert()
    ids = tokens(2, 12)
    bound = {}
    if method in NEEDS_AN_INPUT:
        needed, make = NEEDS_AN_INPUT[method]
        with hf.patched(model, method, backend=backend):
            with pytest.raises((TypeError, ValueError), match=f"layer 0 .*{needed}"):
                run(model, ids)
        bound = make()
    with hf.patched(model, method, backend=backend, **bound):
        logits = run(model, ids)
    assert torch.isfinite(logits).all()


def test_failed_patch_leaves_model_untouched(register):
    def broken(shape, params):
        raise RuntimeError("cannot build")

    register("test_hf_broken", lambda q, k, v, **kw: q)
    hf.register_adapter("test_hf_broken", broken, lambda a, x: {}, overwrite=True)
    model = llama()
    with pytest.raises(RuntimeError, match="cannot build"):
        hf.patch(model, "test_hf_broken")
    assert model.config._attn_implementation == "sdpa"
    assert not any(hasattr(m, "attnzoo") for _, m in hf.attention_layers(model))
    hf.patch(model, method_or_skip("dense"), **TORCH)  # and it can be patched afterwards
    hf.unpatch(model)


def test_no_test_method_leaks():
    """Last in the file: the methods and adapters the tests above registered are gone."""
    assert not [name for name in attnzoo.list_methods() if name.startswith("test_hf_")]
    assert not hf._ADAPTERS
