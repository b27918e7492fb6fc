"""Issue 16, item 6: every method called from two threads at once, under the Triton interpreter
(backend="triton" on CPU tensors) and on the torch backend, returns what the same calls return one
after the other. The interpreter keeps global state, so attnzoo serialises interpreted launches
(attnzoo/_env.py `serialised`); before that six methods raised InterpreterError and lawcat returned a
wrong output."""

import threading

import pytest
import torch

import attnzoo
from attnzoo.block_mask import BlockMask
from attnzoo.registry import REGISTRY

pytestmark = pytest.mark.usefixtures("one_thread")

N, BLOCK = 32, 16
PARAMS = {
    "block_sparse": dict(block_size=BLOCK),
    "xattention": dict(block_size=BLOCK, stride=4, threshold=0.6),
    "s2": dict(block_size=BLOCK, local_blocks=1, vert_stride=2),
    "sparsed": dict(block_size=BLOCK, skip=0.0),
    "seerattention": dict(block_size=BLOCK, topk_ratio=0.5),
}
HEAD_DIM = {"based": 8}  # BASED's features grow as D^2: keep the interpreted kernels small


def _case(name: str, backend: str, seed: int):
    """(one Method shared by both threads, its q, k, v (GQA: 2 query heads, 1 kv head), causal, backend)."""
    gen = torch.Generator().manual_seed(seed)
    d = HEAD_DIM.get(name, 16)
    q = torch.randn(1, 2, N, d, generator=gen)
    k, v = (torch.randn(1, 1, N, d, generator=gen) for _ in range(2))
    info = attnzoo.info(name)
    causal = info.supports.causal
    params = dict(PARAMS.get(name, {}))
    if name not in PARAMS and hasattr(info.load_module(), "example_kwargs"):
        torch.manual_seed(seed)
        params.update(info.load_module().example_kwargs(q, k, v, causal=causal))
    if name == "block_sparse":
        chosen = torch.rand(1, 2, N // BLOCK, N // BLOCK, generator=gen) < 0.5
        params["block_mask"] = BlockMask(chosen | torch.eye(N // BLOCK, dtype=torch.bool), BLOCK)
    return attnzoo.get(name, **params), (q, k, v), causal, backend


def _run(case):
    method, qkv, causal, backend = case
    return method(*qkv, causal=causal, backend=backend)


def test_every_method_from_two_threads_matches_the_serial_results():
    cases = {(name, backend): _case(name, backend, seed)
             for seed, (name, backend) in enumerate((n, b) for n in REGISTRY.names() for b in ("triton", "torch"))}
    serial = {key: _run(case) for key, case in cases.items()}
    results, errors = [{}, {}], []

    def worker(slot: int, order: list) -> None:
        for key in order:
            try:
                results[slot][key] = _run(cases[key])
            except Exception as error:  # collected: an exception in a thread would not fail the test
                errors.append((key, repr(error)))

    keys = list(cases)
    threads = [threading.Thread(target=worker, args=(0, keys)), threading.Thread(target=worker, args=(1, keys[::-1]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for slot in results:
        assert slot.keys() == serial.keys()
        wrong = [key for key, out in slot.items() if not torch.equal(out, serial[key])]
        assert not wrong, wrong
