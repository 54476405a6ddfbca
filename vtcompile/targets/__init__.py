"""Lowering targets: one module per backend, each with ``is_available()``, ``lower(program) -> callable``,
``save_stage(program, lowered, dir) -> manifest entry`` and ``load_stage(dir, entry) -> callable``.

A lowered stage is called like the program: (inputs_embeds, attention_mask, position_ids, visual_mask) ->
(logits, positions, visual). Programs with dynamic exits are lowered one per-layer stage at a time
(``lower_exits``, see targets/staged.py). Optional backends (onnxruntime, torch_tensorrt) are imported lazily, inside
the functions that need them, never at package import.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import TargetUnavailableError
from . import eager, inductor, onnx, tensorrt


@dataclass(frozen=True)
class Target:
    name: str
    summary: str
    lower: Callable | None
    is_available: Callable[[], bool]
    requirement: str = ""
    save_stage: Callable | None = None
    load_stage: Callable | None = None
    stage_format: str = "pt2"
    # Programs with dynamic exits (per-layer stages, targets/staged.py): lower_exits(program) -> ExitProgram,
    # and the per-stage save/load an artifact uses.
    lower_exits: Callable | None = None
    save_graph_stage: Callable | None = None
    load_graph_stage: Callable | None = None


def _target(module, name: str, summary: str, fmt: str = "pt2", requirement: str = "") -> Target:
    return Target(name, summary, module.lower, module.is_available, requirement or getattr(module, "REQUIREMENT", ""),
                  module.save_stage, module.load_stage, fmt, module.lower_exits,
                  getattr(module, "save_graph_stage", None), getattr(module, "load_graph_stage", None))


TARGETS: dict[str, Target] = {
    "eager": _target(eager, "eager", "the rewritten FX GraphModules run by PyTorch (reference for parity)"),
    "inductor": _target(inductor, "inductor", "torch.compile/Inductor of each stage, symbolic batch and "
                                              "sequence (compiles once, no recompilation per prompt length)"),
    "onnx": _target(onnx, "onnx", "ONNX export (dynamo) of each stage run by ONNX Runtime (TensorRT/CUDA "
                                  "providers when present, CPU otherwise)", fmt="onnx"),
    "tensorrt": _target(tensorrt, "tensorrt", "torch-tensorrt dynamo compile of each stage (static-k selection, "
                                              "index_select gathers); GPU only"),
}


def get_target(name: str) -> Target:
    target = TARGETS.get(name)
    if target is None:
        raise TargetUnavailableError(f"unknown target {name!r}; targets: {', '.join(TARGETS)}")
    if not target.is_available():
        here = [n for n, t in TARGETS.items() if t.is_available()]
        raise TargetUnavailableError(
            f"target {name!r} is not available on this machine: it needs {target.requirement}. "
            f"Available here: {', '.join(here)}.")
    if target.lower is None:
        raise TargetUnavailableError(
            f"target {name!r} is not implemented in this version of vtcompile; available now: eager")
    return target


def available_targets() -> list[str]:
    return [n for n, t in TARGETS.items() if t.is_available()]
