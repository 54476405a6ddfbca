"""What every target shares: the decoder stage's calling convention and its re-export with dynamic axes.

A rewritten Program is an FX GraphModule; the inductor, onnx and tensorrt targets and every artifact start
from it re-exported with torch.export, batch and sequence symbolic, so one compiled stage serves every
prompt length and batch size (the token counts inside stay static given S: kept = S - removed).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..compiler.program import dynamic_batch_and_seq

INPUT_NAMES = ("inputs_embeds", "attention_mask", "position_ids", "visual_mask")
OUTPUT_NAMES = ("logits", "positions", "visual")
MAX_BATCH = 4096
MAX_SEQ = 32768


def stem(program) -> str:
    """File stem of a program's stage in an artifact: one decoder stage per visual-token count."""
    return f"decoder-v{program.n_visual}"


def min_seq(program) -> int:
    """Shortest prompt the stage accepts: its visual tokens plus the last (text) token."""
    return max(2, program.n_visual + 1)


def example_args(program) -> tuple[torch.Tensor, ...]:
    """Real (zero-filled) inputs with the shapes the program was captured with; used to trace and warm up."""
    return tuple(program.fake_inputs.examples)


def export_program(program, gm: torch.fx.GraphModule | None = None) -> torch.export.ExportedProgram:
    """torch.export the rewritten graph (or `gm`, a transformed copy) with dynamic batch and sequence axes."""
    from ..errors import UnsupportedModelError

    gm = program.gm if gm is None else gm
    args = example_args(program)
    try:
        with torch.no_grad():
            return torch.export.export(gm, args, dynamic_shapes=dynamic_batch_and_seq(
                len(args), min_seq=min_seq(program), max_seq=MAX_SEQ, max_batch=MAX_BATCH))
    except Exception as exc:  # noqa: BLE001 - re-raised with what was being exported
        raise UnsupportedModelError(
            f"re-exporting the rewritten decoder ({', '.join(program.applied) or 'no passes'}, {program.n_visual} "
            f"visual tokens) with dynamic batch/sequence failed: {type(exc).__name__}: {exc}") from exc


def stage_info(program, files: list[str], fmt: str) -> dict:
    """The manifest entry of one stage file."""
    return {"name": "decoder", "n_visual": program.n_visual, "format": fmt, "files": files,
            "inputs": list(INPUT_NAMES), "outputs": list(OUTPUT_NAMES),
            "dynamic": {"batch": [1, MAX_BATCH], "seq": [min_seq(program), MAX_SEQ]},
            "visual_tokens_per_layer": list(program.schedule), "passes": list(program.applied)}


def save_pt2(ep: torch.export.ExportedProgram, directory: Path, name: str) -> list[str]:
    torch.export.save(ep, str(directory / f"{name}.pt2"))
    return [f"{name}.pt2"]


def save_graph_pt2(ep, lowered, directory: Path, name: str, inputs: list[str], outputs: list[str]) -> list[str]:
    """save_graph_stage of the targets that store a per-layer stage as its exported program."""
    return save_pt2(ep, directory, name)


def load_pt2(directory: Path, info: dict) -> torch.export.ExportedProgram:
    return torch.export.load(str(directory / info["files"][0]))


def strip_guards(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the input-shape guard call that ExportedProgram.module() inserts (the runtime checks inputs)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and "guard" in str(n.target):
            gm.graph.erase_node(n)
    gm.recompile()
    return gm
