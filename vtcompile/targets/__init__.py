"""Lowering targets: one module per backend, each lowering, saving and loading ONE stage.

Every module provides
    is_available() -> bool, REQUIREMENT (what is missing when it is not)
    lower(stage, exported) -> callable          (exported: the stage's ExportedProgram, or None when
                                                  NEEDS_EXPORT is False; the callable takes the stage's inputs
                                                  in order and returns its outputs as a tuple)
    save(stage, exported, lowered, directory) -> [file names]   (exported: a function giving the ExportedProgram)
    load(stage, directory, files) -> callable
and the flags NEEDS_EXPORT, FORMAT (artifact file format), DECODES (whether the decode step runs on it; when
not, DECODE_NOTE says why), IN_PLACE_DECODE (default True; False: the step's functional form, which returns
its written caches), SAVES_LOWERED (default False; True: save stores what lower made, so a stage is lowered
before it is saved) and optionally prepare(program) -> program (a compiler transform the backend needs,
run before staging). A stage is the one graph of a static program, a per-layer graph of a program with
branches, or the decode step (compiler/staged.py, compiler/decode.py). Optional backends (onnxruntime,
torch_tensorrt) are imported lazily, inside the functions that need them, never at package import.
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
    module: object

    @property
    def requirement(self) -> str:
        return getattr(self.module, "REQUIREMENT", "")

    def is_available(self) -> bool:
        return self.module.is_available()

    @property
    def needs_export(self) -> bool:
        return self.module.NEEDS_EXPORT

    @property
    def file_format(self) -> str:
        return self.module.FORMAT

    @property
    def decodes(self) -> bool:
        return self.module.DECODES

    @property
    def in_place_decode(self) -> bool:
        """Whether the decode step may write its caches in place (else its functional form returns them)."""
        return getattr(self.module, "IN_PLACE_DECODE", True)

    @property
    def decode_note(self) -> str:
        return getattr(self.module, "DECODE_NOTE", "")

    @property
    def saves_lowered(self) -> bool:
        """Whether saving a stage stores what lowering made (then artifacts lower a stage before saving it, so that
        it is compiled once and usable in this process too)."""
        return getattr(self.module, "SAVES_LOWERED", False)

    @property
    def prepare(self) -> Callable | None:
        return getattr(self.module, "prepare", None)

    def lower(self, stage, exported):
        return self.module.lower(stage, exported)

    def save(self, stage, exported, lowered, directory) -> list[str]:
        return self.module.save(stage, exported, lowered, directory)

    def load(self, stage, directory, files):
        return self.module.load(stage, directory, files)


TARGETS: dict[str, Target] = {
    "eager": Target("eager", "the rewritten FX GraphModules run by PyTorch (reference for parity)", eager),
    "inductor": Target("inductor", "AOTInductor package of each stage, symbolic batch and lengths (compiled once "
                                   "ahead of time; an artifact loads without compiling)", inductor),
    "onnx": Target("onnx", "ONNX export (dynamo) of each stage run by ONNX Runtime (TensorRT/CUDA providers when "
                           "present, CPU otherwise)", onnx),
    "tensorrt": Target("tensorrt", "torch-tensorrt dynamo compile of each stage (static-k selection, index_select "
                                   "gathers); GPU only", tensorrt),
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
    return target


def available_targets() -> list[str]:
    return [n for n, t in TARGETS.items() if t.is_available()]
