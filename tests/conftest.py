import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
