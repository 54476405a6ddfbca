"""The inductor target: torch.compile (Inductor) of each stage, one graph for every prompt shape.

The stage compiled is the stage re-exported with its symbolic dims (the same graph an artifact stores, so
loading an artifact compiles exactly what was tested). Every call marks the stage's symbolic dims dynamic and,
on the CPU, the batch unbacked (one symbol shared by every batched input): Dynamo then never specialises on a
prompt length, a cache length nor on batch 1 vs >1, so a stage compiles once. On CUDA the batch stays a backed
symbol (SDPA's kernel choice asks whether batch == 1), so batch 1 and batch > 1 may compile a graph each; and the
decode step runs under CUDA graphs (mode "reduce-overhead", the gpt-fast recipe), recorded once per cache shape;
on the CPU it is compiled with Inductor's C++ wrapper (no Python call per kernel).
The decode step writes its caches in place (index_copy_ on its inputs); Inductor keeps those mutations.
Compile time is measured apart from run time (`compile_seconds`, `compiles`). CPU kernels need a C++ compiler;
CUDA kernels need triton (shipped with CUDA builds of torch).
"""
from __future__ import annotations

import importlib.util
import shutil
import sys
import time
from pathlib import Path

import torch

from ..compiler.export import strip_guards
from .eager import load_pt2, save_pt2

REQUIREMENT = "a C++ compiler (g++ or clang++) for CPU kernels, or CUDA with triton"
NEEDS_EXPORT = True
FORMAT = "pt2"
DECODES = True


def is_available() -> bool:
    if torch.cuda.is_available():
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


class InductorStage:
    """A torch.compile'd stage; call it with the stage's inputs in order."""

    def __init__(self, module: torch.nn.Module, stage):
        self.module = module
        self.stage = stage
        self.label = stage.name
        self.compile_seconds = 0.0
        self.compiles = 0
        self._fn = None
        self._last_shapes = None  # input shapes of the last call (see __call__)
        self.marked_calls = 0  # calls that marked their inputs (the others had the last call's shapes)

    def _compiled(self, cuda: bool):
        if self._fn is None:
            decode = self.stage.role == "decode"
            mode = "reduce-overhead" if cuda and decode else None
            # A CPU decode step is many small kernels per token; Inductor's C++ wrapper calls them without a
            # Python call per kernel (bench/README.md, generation: 0.71 -> 0.58 ms/token on the testbed).
            options = {"cpp_wrapper": True} if decode and not cuda else None
            self._fn = torch.compile(self.module, fullgraph=True, mode=mode, options=options)
        return self._fn

    def _mark(self, i: int, t: torch.Tensor) -> None:
        from torch._dynamo.decorators import mark_unbacked, maybe_mark_dynamic

        batched = self.stage.batched[i]
        for d in self.stage.dynamic[i]:
            if d == 0 and batched:
                continue
            maybe_mark_dynamic(t, d)
        if batched:
            if t.is_cuda:
                # CUDA's SDPA kernel choice branches on the batch size (batch == 1), which an unbacked
                # symbol cannot answer: there the batch stays a backed symbol, so batch 1 and batch > 1
                # may compile one graph each; the other axes stay symbolic either way.
                maybe_mark_dynamic(t, 0)
            else:
                mark_unbacked(t, 0, shape_id="vt_batch")

    def __call__(self, *args):
        from torch._dynamo.utils import counters

        shapes = tuple(t.shape for t in args)
        if shapes == self._last_shapes:
            # The shapes of the previous call, which ran a graph: its guards pass again, so the marks (Python work
            # per input, on every decode step) are not needed to pick it.
            with torch.no_grad():
                return self._fn(*args)
        self.marked_calls += 1
        marked = []
        for i, t in enumerate(args):
            t = t.detach()  # an alias: the marks stay off the caller's tensors, in-place writes still reach them
            self._mark(i, t)
            marked.append(t)
        fn = self._compiled(args[0].is_cuda)
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn(*marked)
        self._last_shapes = shapes
        if counters["stats"]["unique_graphs"] != graphs:
            self.compiles += 1
            self.compile_seconds += time.perf_counter() - t0
            print(f"[vtcompile] inductor: compiled {self.label} in {time.perf_counter() - t0:.1f}s",
                  file=sys.stderr, flush=True)
        return out


def lower(stage, exported) -> InductorStage:
    """Compile the re-exported stage at its first call (compile time reported apart)."""
    return InductorStage(strip_guards(exported.module()), stage)


def save(stage, exported, lowered, directory: Path) -> list[str]:
    return save_pt2(stage, exported, directory)


def load(stage, directory: Path, files: list[str]) -> InductorStage:
    """Compile the stored stage on first use (Inductor's cache makes a repeat load fast)."""
    return InductorStage(strip_guards(load_pt2(directory, files).module()), stage)
