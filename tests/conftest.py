"""Test harness.

- Triton kernels run on CPU tensors under the Triton interpreter: TRITON_INTERPRET=1 is set here,
  before anything imports triton. Under the interpreter attnzoo launches kernels with one small fixed
  tile configuration instead of autotuning (see attnzoo/kernels/_config.py), so that small shapes
  still cross several tiles. The torch backend is tested in the same process with backend="torch".
- ATTNZOO_POISON=1: every kernel output buffer is filled with NaN before the kernel writes it.
- Hypothesis profiles: "ci" (default, few examples) and "thorough" (many):
  `pytest --hypothesis-profile=thorough`.
- `@pytest.mark.gpu` tests run only where CUDA is available.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("ATTNZOO_POISON", "1")  # kernel outputs start as NaN: unwritten elements show

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

_common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], derandomize=False)
settings.register_profile("ci", max_examples=12, **_common)
settings.register_profile("thorough", max_examples=200, **_common)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (use it with pytest.mark.usefixtures): tiny models gain nothing
    from threads, and on a busy 2-core machine threads contend badly."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
