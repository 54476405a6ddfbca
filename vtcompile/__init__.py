"""vtcompile: visual-token pruning for multimodal LLMs as compiled graph passes.

Import stays lean: the heavy modules (torch, transformers) load on first use of the API.
"""
from __future__ import annotations

__version__ = "0.1.1"

_LAZY = {
    "compile_pruned": "vtcompile.api",
    "load_compiled": "vtcompile.api",
    "CompiledModel": "vtcompile.api",
    "load_model": "vtcompile.models",
    "VtcompileError": "vtcompile.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vtcompile' has no attribute {name!r}")
