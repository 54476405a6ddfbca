import os
import shutil
import tempfile

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Inductor's on-disk cache is keyed without the CPU's vector ISA, so a cache left in /tmp by another machine (or
# by a process that probed a different ISA) can hand this run kernels that do not build here. Unless the caller
# chose a cache (TORCHINDUCTOR_CACHE_DIR), the run gets a fresh one of its own, shared with the CLI subprocesses
# it starts and removed at the end.
_PRIVATE_INDUCTOR_CACHE = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _PRIVATE_INDUCTOR_CACHE = tempfile.mkdtemp(prefix="vtcompile-tests-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = _PRIVATE_INDUCTOR_CACHE


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)


def pytest_sessionfinish(session, exitstatus):
    # A run that collected nothing must fail loudly, not pass as "no tests" (pytest's exit 5).
    if session.testscollected == 0:
        session.exitstatus = 1


def pytest_unconfigure(config):
    if _PRIVATE_INDUCTOR_CACHE is not None:
        shutil.rmtree(_PRIVATE_INDUCTOR_CACHE, ignore_errors=True)
