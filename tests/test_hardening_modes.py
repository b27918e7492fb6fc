"""Issue 16, items 1, 3 and 8: every method under torch.inference_mode() and torch.no_grad() on both
backends; the caches are bounded (BlockMask's index: replaced on an edit, nothing kept from a failed
call; s2's patterns over many shapes; the op implementation table); dense and the linear methods give
correctly shaped outputs on the meta device; a method registered with supports.backward=False refuses
`.backward()` on both backends (docs/hardening.md)."""

import pytest
import torch

import attnzoo
from attnzoo.block_mask import INDEX_CACHE_ENTRIES, BlockMask
from attnzoo.registry import REGISTRY

BACKENDS = ["triton", "torch"]
# 32 tokens, head dim 16: block_size 16 where a method has one, so that sparse methods pick among blocks
SMALL_BLOCKS = {"block_sparse": 16, "xattention": 16, "s2": 16, "sparsed": 16, "seerattention": 16}


def _inputs(name, *, n=32, seed=0):
    """q, k, v (1, 2, n, 16), the method's call keywords and whether it runs causally."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 16, generator=gen) for _ in range(3))
    info = attnzoo.info(name)
    causal = info.supports.causal
    params = {"block_size": SMALL_BLOCKS[name]} if name in SMALL_BLOCKS else {}
    if name == "s2":
        params.update(local_blocks=1, vert_stride=2)
    if name == "sparsed":
        params.update(skip=0.0)
    module = info.load_module()
    if hasattr(module, "example_kwargs"):
        torch.manual_seed(seed)
        params.update(module.example_kwargs(q, k, v, causal=causal))
    if name == "block_sparse":
        blocks = torch.rand(1, 1, n // 16, n // 16, generator=gen) < 0.6
        params["block_mask"] = BlockMask(blocks | torch.eye(n // 16, dtype=torch.bool), 16)
    return q, k, v, params, causal


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("name", REGISTRY.names())
def test_every_method_runs_under_inference_mode_and_no_grad(name, mode, backend):
    q, k, v, params, causal = _inputs(name)
    want = attnzoo.get(name)(q, k, v, causal=causal, backend=backend, **params)
    with getattr(torch, mode)():
        got = attnzoo.get(name)(q, k, v, causal=causal, backend=backend, **params)
        again = attnzoo.get(name)(q, k, v, causal=causal, backend=backend, **params)
    assert torch.equal(got, want) and torch.equal(again, want)
    later = attnzoo.get(name)(q, k, v, causal=causal, backend=backend, **params)  # nothing stale was cached
    assert torch.equal(later, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_block_mask_made_in_inference_mode_works_in_and_out_of_it(backend):
    q, k, v, params, _ = _inputs("block_sparse")
    want = attnzoo.get("block_sparse")(q, k, v, causal=True, backend=backend, **params)
    with torch.inference_mode():
        mask = BlockMask(params["block_mask"].mask.clone(), 16)
        inside = attnzoo.get("block_sparse")(q, k, v, causal=True, backend=backend, block_mask=mask)
        mask.mask[0, 0] = ~mask.mask[0, 0]  # edited in place: an inference tensor has no version to follow
        edited = attnzoo.get("block_sparse")(q, k, v, causal=True, backend=backend, block_mask=mask)
    outside = attnzoo.get("block_sparse")(q, k, v, causal=True, backend=backend, block_mask=mask)
    assert torch.equal(inside, want)
    assert not torch.equal(edited, want) and torch.equal(outside, edited)
    assert len(mask._index_cache) == 0  # never cached: it could not tell an edit


def _cache_bytes(mask: BlockMask) -> int:
    return sum(t.numel() * t.element_size() for _, index in mask._index_cache.values()
               for t in vars(index).values() if isinstance(t, torch.Tensor))


def test_block_mask_index_cache_is_bounded_and_an_edit_replaces_its_entry():
    mask = BlockMask(torch.rand(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.5, 16)
    for edit in range(30):  # 30 in-place edits at one geometry: one entry, rebuilt each time
        mask.mask[0, 0, edit % 8, (3 * edit) % 8] ^= True
        index = mask.sparse_index(128, 128, causal=True)
        assert len(mask._index_cache) == 1
        assert mask.sparse_index(128, 128, causal=True) is index  # unchanged mask: served from the cache
    assert torch.equal(index.kv_count_full + index.kv_count_part,
                       (mask.mask & torch.ones(8, 8, dtype=torch.bool).tril()).sum(-1, dtype=torch.int32))
    for n in range(113, 129):  # 16 geometries: the least recently used ones go
        mask.sparse_index(n, 128, causal=False)
        assert len(mask._index_cache) <= INDEX_CACHE_ENTRIES
    # the documented bound: about 16 bytes per mask element (4 int32 lists) plus the counts, per entry
    per_entry = 16 * mask.mask.numel() + 4 * 4 * 2 * 4 * 8
    assert _cache_bytes(mask) <= INDEX_CACHE_ENTRIES * per_entry
    mask.mask = mask.mask.clone()  # replaced: a new storage, so the entry is rebuilt, not added
    mask.sparse_index(128, 128, causal=False)
    assert len(mask._index_cache) <= INDEX_CACHE_ENTRIES


def test_a_failed_call_leaves_nothing_in_the_index_cache():
    mask = BlockMask(torch.ones(1, 1, 2, 2, dtype=torch.bool), 16)
    q = torch.randn(1, 2, 32, 16)
    with pytest.raises(ValueError):  # 48 keys need 3 key blocks, the mask has 2
        attnzoo.get("block_sparse")(q, torch.randn(1, 2, 48, 16), torch.randn(1, 2, 48, 16), block_mask=mask)
    assert len(mask._index_cache) == 0


@pytest.mark.parametrize("name, causal, inputs", [
    ("dense", True, {}),
    ("gla", True, {"g": lambda: torch.zeros(1, 2, 40, 16, device="meta")}),
    ("based", True, {}),
    ("based", False, {}),
    ("lawcat", True, {"g": lambda: torch.zeros(1, 2, 40, device="meta"),
                      "conv_q": lambda: torch.zeros(4, 16, 3, device="meta"),
                      "conv_k": lambda: torch.zeros(2, 16, 3, device="meta")}),
    ("wersa", False, {"gains": lambda: torch.ones(3, device="meta")}),
])
def test_dense_and_linear_methods_give_shaped_outputs_on_the_meta_device(name, causal, inputs):
    q = torch.empty(1, 4, 40, 16, device="meta")
    k, v = torch.empty(1, 2, 40, 16, device="meta"), torch.empty(1, 2, 40, 24, device="meta")
    out = attnzoo.get(name)(q, k, v, causal=causal, **{key: make() for key, make in inputs.items()})
    assert out.device.type == "meta" and out.shape == (1, 4, 40, 24) and out.dtype == q.dtype


def test_s2_pattern_cache_stays_bounded_over_many_shapes():
    from attnzoo.methods import s2

    method = attnzoo.get("s2", block_size=16, local_blocks=1, vert_stride=2)
    for n in range(32, 32 + 16 * 12, 16):  # 12 shapes, each its own pattern
        q, k, v = torch.randn(1, 2, n, 16), torch.randn(1, 1, n, 16), torch.randn(1, 1, n, 16)
        method(q, k, v, causal=True, backend="torch")
        assert s2.s2_block_mask.cache_info().currsize <= s2.PATTERN_CACHE_SIZE
    hits = s2.s2_block_mask.cache_info().hits
    method(q, k, v, causal=True, backend="torch")  # the last shape again: served from the cache
    assert s2.s2_block_mask.cache_info().hits == hits + 1


def test_the_implementation_table_holds_one_entry_per_op_and_backend():
    from attnzoo.ops import dispatch

    for name in ("dense", "xattention", "seerattention", "gla"):  # every op: flash, scoring, block_target, linear
        q, k, v, params, causal = _inputs(name)
        for backend in BACKENDS:
            attnzoo.get(name)(q, k, v, causal=causal, backend=backend, **params)
    assert set(dispatch._IMPLEMENTATIONS) <= {(op, backend) for op in ("flash", "linear", "scoring", "block_target")
                                              for backend in BACKENDS}


@pytest.fixture
def registered_without_backward():
    """A method registered with supports.backward=False (dense underneath, with its lse)."""
    def forward_only(q, k, v, *, causal, scale, backend, return_lse=False):
        return attnzoo.get("dense")(q, k, v, causal=causal, scale=scale, backend=backend, return_lse=return_lse)

    attnzoo.register("forward_only_test", forward_only, family="exact", paper="test",
                     supports={"backward": False, "backends": ["triton", "torch"], "outputs": ["return_lse"]})
    yield attnzoo.get("forward_only_test")
    REGISTRY._entries().pop("forward_only_test")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_through_a_method_registered_without_one_raises(registered_without_backward, backend):
    q, k, v = (torch.randn(1, 2, 24, 16, requires_grad=True) for _ in range(3))
    out, lse = registered_without_backward(q, k, v, causal=True, backend=backend, return_lse=True)
    want, want_lse = attnzoo.get("dense")(q, k, v, causal=True, backend=backend, return_lse=True)
    assert torch.equal(out, want) and torch.equal(lse, want_lse)  # the forward is untouched
    for output in (out, lse):
        with pytest.raises(RuntimeError, match="'forward_only_test' has no backward"):
            output.sum().backward(retain_graph=True)
    with torch.no_grad():  # nothing to refuse without a graph
        assert not registered_without_backward(q, k, v, causal=True, backend=backend).requires_grad
