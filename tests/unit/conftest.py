import pytest

from .common import GEOMETRIES, PROMPTS


@pytest.fixture(params=GEOMETRIES)
def geometry(request):
    return request.param


@pytest.fixture(params=list(PROMPTS))
def prompt_kind(request):
    return request.param
