"""The eager target: the rewritten GraphModule as it is (the reference every other target must match)."""
from __future__ import annotations


def lower(program):
    return program.gm
