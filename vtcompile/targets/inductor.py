"""The inductor target: torch.compile (Inductor) of each decoder stage, one graph for every prompt shape.

The stage compiled is the rewritten program re-exported with dynamic axes (the same graph an artifact
stores, so loading an artifact compiles exactly what was tested). Every call marks the sequence axis dynamic
and, on the CPU, the batch axis unbacked (one symbol shared by the four inputs): Dynamo then never
specialises on the prompt length nor on batch 1 vs >1, so a stage compiles once and never recompiles for a
new shape. On CUDA the batch stays a backed symbol (SDPA's kernel choice asks whether batch == 1), so
batch 1 and batch > 1 may compile a graph each; the prompt length never recompiles.
Compile time is measured apart from run time (`compile_seconds`, `compiles`). CPU kernels need a C++
compiler; CUDA kernels need triton (shipped with CUDA builds of torch).
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path

import torch

from . import stage

REQUIREMENT = "a C++ compiler (g++ or clang++) for CPU kernels, or CUDA with triton"


def is_available() -> bool:
    if torch.cuda.is_available():
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _symbolic_dims(module: torch.fx.GraphModule) -> list[list[int]]:
    """Per input of an exported stage: the dims whose size is symbolic in the export."""
    dims = []
    for n in module.graph.nodes:
        if n.op == "placeholder":
            val = n.meta.get("val")
            shape = val.shape if isinstance(val, torch.Tensor) else ()
            dims.append([d for d, s in enumerate(shape) if not isinstance(s, int)])
    return dims


class InductorStage:
    """A torch.compile'd decoder stage; call it like the program: (embeds, mask, positions, visual).

    `batched` (one flag per input) describes a per-layer stage of a program with dynamic exits: there the
    inputs are whatever values cross the layer boundary, and the axes kept symbolic are those the stage's
    export left symbolic, the batch (dim 0 of the flagged inputs) marked as for a whole decoder."""

    def __init__(self, module: torch.nn.Module, exported=None, warmup: tuple | None = None, label: str = "",
                 batched: list[bool] | None = None):
        self.module = module
        self.exported = exported
        self.label = label
        self.compile_seconds = 0.0
        self.compiles = 0
        self.batched = batched
        self._dims = _symbolic_dims(module) if batched is not None else None
        self._fn = torch.compile(module, fullgraph=True)
        if warmup is not None:
            self(*warmup)

    def _mark(self, i: int, t: torch.Tensor) -> None:
        from torch._dynamo.decorators import mark_dynamic, mark_unbacked, maybe_mark_dynamic

        batched = self.batched[i] if self.batched is not None else True
        dynamic = self._dims[i] if self._dims is not None else [1]
        for d in dynamic:
            if d == 0 and batched:
                continue
            (maybe_mark_dynamic if self._dims is not None or t.is_cuda else mark_dynamic)(t, d)
        if batched:
            if t.is_cuda:
                # CUDA's SDPA kernel choice branches on the batch size (batch == 1), which an unbacked
                # symbol cannot answer: there the batch stays a backed symbol, so batch 1 and batch > 1
                # may compile one graph each; the sequence axis stays symbolic either way.
                maybe_mark_dynamic(t, 0)
            else:
                mark_unbacked(t, 0, shape_id="vt_batch")

    def __call__(self, *args):
        from torch._dynamo.utils import counters

        marked = []
        for i, t in enumerate(args):
            t = t.detach()  # alias: the marks stay off the caller's tensors
            self._mark(i, t)
            marked.append(t)
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self._fn(*marked)
        if counters["stats"]["unique_graphs"] != graphs:
            self.compiles += 1
            self.compile_seconds += time.perf_counter() - t0
            print(f"[vtcompile] inductor: compiled {self.label or 'stage'} in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr, flush=True)
        return out


def lower(program) -> InductorStage:
    """Re-export the program with dynamic axes and compile it (now on the CPU, at the first call on CUDA);
    compile time is reported apart."""
    ep = stage.export_program(program)
    example = stage.example_args(program)
    # On CUDA the batch is a backed symbol, so warming up at the example's batch (3) would compile a graph
    # that a batch-1 call cannot reuse: there the first real call compiles (its time is still counted).
    warmup = None if example[0].is_cuda else example
    return InductorStage(stage.strip_guards(ep.module()), exported=ep, warmup=warmup, label=stage.stem(program))


def save_stage(program, lowered: InductorStage, directory: Path) -> dict:
    ep = getattr(lowered, "exported", None) or stage.export_program(program)
    return stage.stage_info(program, stage.save_pt2(ep, directory, stage.stem(program)), "pt2")


def load_stage(directory: Path, info: dict) -> InductorStage:
    """Compile the stored stage on first use (Inductor's cache makes a repeat load fast)."""
    ep = stage.load_pt2(directory, info)
    return InductorStage(stage.strip_guards(ep.module()), exported=ep,
                         label=f"{Path(info['files'][0]).stem} (loaded)")


# -- per-layer stages of programs with dynamic exits (targets/staged.py) ------------------------------------
def lower_graph_stage(ep, label: str, inputs: list[str], outputs: list[str], batched: list[bool]) -> InductorStage:
    return InductorStage(stage.strip_guards(ep.module()), exported=ep, label=label, batched=batched)


save_graph_stage = stage.save_graph_pt2


def load_graph_stage(directory: Path, files: list[str], label: str, inputs: list[str], outputs: list[str],
                     batched: list[bool]) -> InductorStage:
    return lower_graph_stage(torch.export.load(str(directory / files[0])), f"{label} (loaded)", inputs, outputs,
                             batched)


def lower_exits(program):
    """A program with dynamic exits: every per-layer stage compiled at its first call."""
    from .staged import lower_exit_program

    return lower_exit_program(program, lower_graph_stage)
