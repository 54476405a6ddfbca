"""The eager target: the rewritten GraphModule as it is (the reference every other target must match).

Artifacts hold the program re-exported with dynamic batch/sequence (.pt2); loading runs it with PyTorch.
"""
from __future__ import annotations

from pathlib import Path

from . import stage


def is_available() -> bool:
    return True


def lower(program):
    return program.gm


def save_stage(program, lowered, directory: Path) -> dict:
    ep = getattr(lowered, "exported", None) or stage.export_program(program)
    return stage.stage_info(program, stage.save_pt2(ep, directory, stage.stem(program)), "pt2")


def load_stage(directory: Path, info: dict):
    return stage.load_pt2(directory, info).module()
