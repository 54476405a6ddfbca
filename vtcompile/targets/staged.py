"""Programs with dynamic exits on every target: each per-layer stage is lowered, saved and loaded on its own.

A program with exits (compiler.staged.ExitProgram) is one graph per layer for the base program and for each
text-only continuation; the control flow between them (run a stage, ask the routers, switch graphs) stays in
Python. A target lowers such a program stage by stage: every stage is re-exported with all axes free
(torch.export Dim.AUTO, on inputs made by running the stages before it on the program's example inputs, so
batch and lengths stay symbolic), then handed to the target's `lower_graph_stage`. Stages are lowered at
their first call: a continuation that no row ever takes costs nothing (a 32-layer model has 528 stages).

Each target module that supports this provides
    lower_graph_stage(ep, label, inputs, outputs, batched) -> callable
    save_graph_stage(ep, lowered | None, directory, name, inputs, outputs) -> [file names]
    load_graph_stage(directory, files, label, inputs, outputs, batched) -> callable
where `inputs`/`outputs` name the values a stage exchanges and `batched[i]` says whether input i has the
batch on dim 0 (rows are regrouped between stages when some exit).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch.export import Dim

from ..compiler.staged import ExitProgram, Stage, StagedGraph, exit_program
from ..errors import UnsupportedModelError
from . import stage as st


def export_graph_stage(module: torch.nn.Module, args: tuple, label: str) -> torch.export.ExportedProgram:
    """torch.export one stage with every axis free (Dim.AUTO: sizes the graph does not pin stay symbolic).
    Axes of size 1 in the example (broadcast axes of masks) are left static: export would specialise them anyway,
    with a warning per stage."""
    shapes = tuple({d: Dim.AUTO for d in range(t.dim()) if t.shape[d] != 1} for t in args)
    try:
        with torch.no_grad():
            return torch.export.export(module, args, dynamic_shapes=shapes)
    except Exception as exc:  # noqa: BLE001 - re-raised with the stage that failed
        raise UnsupportedModelError(f"exporting stage {label} of the dynamic-exit program failed: "
                                    f"{type(exc).__name__}: {exc}") from exc


def eager_module(s: Stage) -> torch.nn.Module:
    """The FX module of a stage, also when the stage has been wrapped for a target."""
    return s.module.module if isinstance(s.module, LazyStage) else s.module


def stage_name(stem: str, exit_layer: int | None, layer: int) -> str:
    return f"{stem}-layer{layer}" if exit_layer is None else f"{stem}-exit{exit_layer}-layer{layer}"


def walk(xp: ExitProgram, examples: tuple) -> Iterator[tuple[int | None, int, Stage, tuple]]:
    """Every stage that some row can run, with example inputs for it: (exit layer or None for the base
    graph, layer, stage, args). Runs the eager stages once each on `examples`."""
    env = dict(zip(xp.base.placeholders, examples))
    after = {}
    with torch.no_grad():
        for i, s in enumerate(xp.base.stages):
            yield None, i, s, tuple(env[n] for n in s.inputs)
            _run_eager(s, env)
            if i in xp.exits:
                after[i] = dict(env)
        for e, g in sorted(xp.exits.items()):
            sub = dict(after[e])
            for i in range(e + 1, len(g.stages)):
                s = g.stages[i]
                yield e, i, s, tuple(sub[n] for n in s.inputs)
                _run_eager(s, sub)


def _run_eager(s: Stage, env: dict) -> None:
    env.update(zip(s.outputs, eager_module(s)(*[env[n] for n in s.inputs])))


def _stage_examples(xp: ExitProgram, examples: tuple, exit_layer: int | None, layer: int) -> tuple:
    """Example inputs of one stage: the eager stages before it run on `examples` (base graph up to the exit,
    then the continuation)."""
    env = dict(zip(xp.base.placeholders, examples))
    with torch.no_grad():
        for j in range(layer if exit_layer is None else exit_layer + 1):
            _run_eager(xp.base.stages[j], env)
        if exit_layer is not None:
            for j in range(exit_layer + 1, layer):
                _run_eager(xp.exits[exit_layer].stages[j], env)
    graph = xp.base if exit_layer is None else xp.exits[exit_layer]
    return tuple(env[n] for n in graph.stages[layer].inputs)


class LazyStage:
    """One stage of a staged program, exported and lowered to a target at its first call (timed apart)."""

    def __init__(self, module: torch.nn.Module, examples: Callable[[], tuple], lower: Callable, label: str,
                 inputs: list[str], outputs: list[str], batched: list[bool]):
        self.module = module
        self.examples = examples
        self.lower = lower
        self.label = label
        self.inputs, self.outputs, self.batched = inputs, outputs, batched
        self.exported: torch.export.ExportedProgram | None = None
        self.lowered = None
        self.compile_seconds = 0.0

    def export(self) -> torch.export.ExportedProgram:
        if self.exported is None:
            self.exported = export_graph_stage(self.module, self.examples(), self.label)
        return self.exported

    def __call__(self, *args):
        if self.lowered is None:
            t0 = time.perf_counter()
            self.lowered = self.lower(self.export(), self.label, self.inputs, self.outputs, self.batched)
            out = self.lowered(*args)  # a lazy backend compiles at its first call: counted here
            self.compile_seconds = time.perf_counter() - t0
            return out
        return self.lowered(*args)


def lower_exit_program(program, lower_graph_stage: Callable) -> ExitProgram:
    """The program's ExitProgram with every stage lowered (at its first call) by `lower_graph_stage`."""
    eager = exit_program(program)
    examples = st.example_args(program)
    stem = st.stem(program)

    def wrap(g: StagedGraph, exit_layer: int | None, shared: list[Stage]) -> StagedGraph:
        stages = list(shared)
        for i in range(len(shared), len(g.stages)):
            s = g.stages[i]
            stages.append(Stage(LazyStage(
                s.module, lambda e=exit_layer, i=i: _stage_examples(eager, examples, e, i), lower_graph_stage,
                stage_name(stem, exit_layer, i), s.inputs, s.outputs, [n in g.batched for n in s.inputs]),
                s.inputs, s.outputs))
        return StagedGraph(stages, g.placeholders, g.results, g.residual, g.batched)

    base = wrap(eager.base, None, [])
    exits = {e: wrap(g, e, base.stages[:e + 1]) for e, g in eager.exits.items()}
    return ExitProgram(base, exits, eager.decide, eager.visual_names)


def compile_seconds(xp: ExitProgram) -> float:
    """Time spent so far lowering the stages of a staged program (each stage counted once)."""
    seen = {id(s.module): s.module for g in (xp.base, *xp.exits.values()) for s in g.stages}
    return sum(getattr(m, "compile_seconds", 0.0) for m in seen.values())


# -- artifacts --------------------------------------------------------------------------------------------
def _graph_info(g: StagedGraph, stages: list[dict]) -> dict:
    return {"stages": stages, "placeholders": list(g.placeholders), "results": list(g.results),
            "residual": list(g.residual), "batched": sorted(g.batched)}


def save_exit_program(program, xp: ExitProgram, directory: Path, target) -> dict:
    """Write every stage of `xp` with the target's save_graph_stage; returns the manifest's staged section
    (the decision rule is the caller's). Stages up to an exit are the base graph's and are stored once."""
    stem = st.stem(program)
    base, exits = [], {}
    for e, i, s, args in walk(xp, st.example_args(program)):
        name = stage_name(stem, e, i)
        lazy = s.module if isinstance(s.module, LazyStage) else None
        ep = lazy.export() if lazy is not None else export_graph_stage(s.module, args, name)
        files = target.save_graph_stage(ep, lazy.lowered if lazy is not None else None, directory, name,
                                        s.inputs, s.outputs)
        entry = {"files": files, "inputs": list(s.inputs), "outputs": list(s.outputs)}
        (base if e is None else exits.setdefault(e, [])).append(entry)
    return {"base": _graph_info(xp.base, base),
            "exits": {str(e): _graph_info(g, exits.get(e, [])) for e, g in sorted(xp.exits.items())},
            "visual": {str(e): n for e, n in xp.visual_names.items()}}


def load_exit_graphs(path: Path, staged: dict, target) -> tuple[StagedGraph, dict[int, StagedGraph], dict]:
    """The base graph, the continuations and the visual-mask names stored by save_exit_program."""

    def graph(g: dict, shared: list[Stage]) -> StagedGraph:
        batched = set(g["batched"])
        stages = list(shared) + [
            Stage(target.load_graph_stage(path, s["files"], Path(s["files"][0]).stem, s["inputs"], s["outputs"],
                                          [n in batched for n in s["inputs"]]), s["inputs"], s["outputs"])
            for s in g["stages"]]
        return StagedGraph(stages, g["placeholders"], g["results"], g["residual"], batched)

    base = graph(staged["base"], [])
    exits = {int(e): graph(g, base.stages[:int(e) + 1]) for e, g in staged["exits"].items()}
    return base, exits, {int(e): n for e, n in staged["visual"].items()}
