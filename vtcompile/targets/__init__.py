"""Lowering targets. Each has ``is_available()`` and ``lower(program) -> callable``.

Only ``eager`` is built so far; inductor, onnx and tensorrt are known names with a clear message (their
lowering is tracked in the targets issue). Optional backends are imported lazily, never at package import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import TargetUnavailableError
from . import eager


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    lower: Callable | None
    is_available: Callable[[], bool]
    requirement: str = ""


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _tensorrt() -> bool:
    import importlib.util

    return _cuda() and importlib.util.find_spec("torch_tensorrt") is not None


TARGETS: dict[str, Target] = {
    "eager": Target("eager", "the rewritten FX GraphModules run by PyTorch (reference for parity)",
                    eager.lower, lambda: True),
    "inductor": Target("inductor", "torch.compile/Inductor of each stage (not built yet)", None, lambda: True),
    "onnx": Target("onnx", "ONNX export + ONNX Runtime (not built yet)", None, lambda: True),
    "tensorrt": Target("tensorrt", "torch-tensorrt dynamo compile of each stage (not built yet)", None, _tensorrt,
                       requirement="a CUDA GPU and the torch-tensorrt package (pip install 'vtcompile[tensorrt]')"),
}


def get_target(name: str) -> Target:
    target = TARGETS.get(name)
    if target is None:
        raise TargetUnavailableError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    if not target.is_available():
        raise TargetUnavailableError(
            f"target {name!r} is not available on this machine: it needs {target.requirement}. "
            "Use --target eager here.")
    if target.lower is None:
        raise TargetUnavailableError(
            f"target {name!r} is not implemented in this version of vtcompile; available now: eager")
    return target
