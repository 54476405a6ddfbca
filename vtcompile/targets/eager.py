"""The eager target: the rewritten FX GraphModules as they are (the reference every other target must match), their
ATen calls made directly (compiler/program.with_direct_calls).

Artifacts hold each stage torch.export'ed with its symbolic dims (.pt2); loading runs it with PyTorch.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..compiler.export import strip_guards
from ..compiler.program import with_direct_calls

NEEDS_EXPORT = False
FORMAT = "pt2"
DECODES = True


def is_available() -> bool:
    return True


def lower(stage, exported):
    return with_direct_calls(stage.module if stage.module is not None else strip_guards(exported.module()))


def save_pt2(stage, exported, directory: Path) -> list[str]:
    """The stage's ExportedProgram as <name>.pt2 (what the pt2 targets store)."""
    torch.export.save(exported(), str(directory / f"{stage.name}.pt2"))
    return [f"{stage.name}.pt2"]


def load_pt2(directory: Path, files: list[str]) -> torch.export.ExportedProgram:
    return torch.export.load(str(directory / files[0]))


def save(stage, exported, lowered, directory: Path) -> list[str]:
    return save_pt2(stage, exported, directory)


def load(stage, directory: Path, files: list[str]):
    return with_direct_calls(strip_guards(load_pt2(directory, files).module()))
