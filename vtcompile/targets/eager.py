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


# -- per-layer stages of programs with dynamic exits (targets/staged.py) ------------------------------------
def lower_exits(program):
    """A program with dynamic exits runs its per-layer FX stages as they are."""
    from ..compiler.staged import exit_program

    return exit_program(program)


save_graph_stage = stage.save_graph_pt2


def load_graph_stage(directory: Path, files: list[str], label: str, inputs: list[str], outputs: list[str],
                     batched: list[bool]):
    import torch

    return stage.strip_guards(torch.export.load(str(directory / files[0])).module())
