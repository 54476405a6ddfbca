"""Stages: every program runs as a list of stages, each lowered, saved and loaded on its own.

A program without branches is ONE stage: its whole graph. A program with branches (compiler.branches: after a
layer, the rows a decision picks continue in another program) needs control flow between layers, so its graph is
split at every layer boundary (partitioned by the vt_pos annotation, compiler.cut.stage_layer); each branch program (the same program with a rewrite at
cut e + 1) is split the same way and shares stages 0..e with the base graph. Values cross stages under their
node names; every stage takes and returns tensors only (sizes are re-read from tensor shapes), has static token
counts given its inputs' lengths, and so compiles and exports on its own. Running stages (and asking the decision
between them) is the runtime's job (runtime/executor.py); this module only builds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.fx as fx

from .cut import stage_layer
from .graph import output_values, same_size, set_outputs, symbolic_dims
from .branches import Decision
from .program import Program
from .signature import END, Signature


@dataclass
class Stage:
    """One graph of a program: reads the values named `inputs`, produces the values named `outputs`.

    `module` is the FX GraphModule (or what a target lowered it to); `batched[i]` says whether input i has the
    batch on dim 0 (rows are regrouped between stages when a decision sends some rows elsewhere); `dynamic[i]` lists
    the dims of input i that stay symbolic (batch, token axes, cache lengths) in exports and compiles."""

    name: str
    module: Callable | None
    inputs: list[str]
    outputs: list[str]
    batched: list[bool]
    dynamic: list[tuple[int, ...]]
    role: str = "prefill"  # or "decode" (a target may lower the decode step differently: CUDA graphs)

    def info(self) -> dict:
        """The stage's entry in an artifact manifest (without its files)."""
        return {"name": self.name, "inputs": list(self.inputs), "outputs": list(self.outputs),
                "batched": list(self.batched), "dynamic": [list(d) for d in self.dynamic], "role": self.role}

    @classmethod
    def from_info(cls, info: dict, module=None) -> "Stage":
        return cls(info["name"], module, list(info["inputs"]), list(info["outputs"]), list(info["batched"]),
                   [tuple(d) for d in info["dynamic"]], info.get("role", "prefill"))


@dataclass
class StagedGraph:
    """One program as stages that exchange values by node name."""

    stages: list[Stage]
    placeholders: list[str]  # the program's inputs, in signature order
    results: list[str]  # node names of the signature's outputs, in order
    residual: list[str] = field(default_factory=list)  # per layer: the residual stream after it (split graphs)

    def info(self) -> dict:
        return {"stages": [s.name for s in self.stages], "placeholders": list(self.placeholders),
                "results": list(self.results), "residual": list(self.residual)}


@dataclass
class StagePlan:
    """What the runtime executes for one program: the base graph and, with a decision, a branch graph per layer
    the decision is asked after (its stages up to that layer are the base graph's)."""

    name: str  # the program's stem: its stages' and files' names start with it
    signature: Signature
    base: StagedGraph
    branches: dict[int, StagedGraph] = field(default_factory=dict)
    decision: Decision | None = None
    visual: dict[int, str] = field(default_factory=dict)  # per branch layer: the visual mask live after it

    def all_stages(self) -> Iterator[Stage]:
        """Every distinct stage (shared stages once)."""
        seen = set()
        for g in (self.base, *self.branches.values()):
            for s in g.stages:
                if id(s) not in seen:
                    seen.add(id(s))
                    yield s

    def map_stages(self, fn: Callable[[Stage], Stage]) -> "StagePlan":
        """The same plan with every stage replaced by fn(stage) (shared stages stay shared)."""
        done: dict[int, Stage] = {}

        def graph(g: StagedGraph) -> StagedGraph:
            stages = []
            for s in g.stages:
                if id(s) not in done:
                    done[id(s)] = fn(s)
                stages.append(done[id(s)])
            return StagedGraph(stages, g.placeholders, g.results, g.residual)

        return StagePlan(self.name, self.signature, graph(self.base),
                         {e: graph(g) for e, g in self.branches.items()}, self.decision, dict(self.visual))


def stem(program: Program) -> str:
    """Name of a program's stages: one decoder program per visual-token count."""
    return f"decoder-v{program.n_visual}"


def _batched(gm: fx.GraphModule) -> set[str]:
    batch = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0]
    return {n.name for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
            and n.meta["val"].dim() and same_size(n.meta["val"].shape[0], batch)}


def whole(program: Program, name: str | None = None) -> Stage:
    """The program's graph as one stage. The stage returns each value once (the program returns the positions
    under several names until the first cut; values are looked up by node name, and ONNX refuses duplicates)."""
    from .program import _copy_graph_module

    gm = _copy_graph_module(program.gm)
    unique = list(dict.fromkeys(output_values(gm)))
    set_outputs(gm, unique, [END] * len(unique))
    gm.recompile()
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    batched = _batched(gm)
    return Stage(name or stem(program), gm, names, [n.name for n in unique], [n in batched for n in names],
                 symbolic_dims(gm))


def stage_program(program: Program) -> StagePlan:
    """The stages of a program: one, or (with branches) one per layer for the base and every branch."""
    gm = program.gm
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    results = [n.name for n in output_values(gm)]
    if program.branches is None:
        return StagePlan(stem(program), program.signature, StagedGraph([whole(program)], placeholders, results))
    base = _split(program, f"{stem(program)}-layer")
    branches = {}
    for e, p in sorted(program.branches.programs.items()):
        g = _split(p, f"{stem(program)}-branch{e}-layer")
        branches[e] = StagedGraph(base.stages[:e + 1] + g.stages[e + 1:], g.placeholders, g.results, g.residual)
    return StagePlan(stem(program), program.signature, base, branches, program.branches.decision,
                     {e: program.visual_name_at(e) for e in program.branches.programs})


# -- splitting a graph into one stage per layer -------------------------------------------------------------
def _stage_of(node: fx.Node, num_layers: int) -> int:
    # the nodes a selection inserts run in the stage of the layer they cut (they belong to the branch)
    return stage_layer(node.meta.get("vt_pos", -1), num_layers)


def _is_size(x: fx.Node) -> bool:
    return isinstance(x.meta.get("val"), torch.SymInt)


def _split(program: Program, prefix: str) -> StagedGraph:
    gm, layers = program.gm, program.geometry.num_layers
    stage_of = {n: _stage_of(n, layers) for n in gm.graph.nodes if n.op not in ("output", "placeholder")}
    results = set(output_values(gm))
    batched = _batched(gm)
    stages = [_build_stage(gm, i, stage_of, results, layers, f"{prefix}{i}", batched) for i in range(layers)]
    return StagedGraph(stages, [n.name for n in gm.graph.nodes if n.op == "placeholder"],
                       [n.name for n in output_values(gm)], [program.residual_name(i) for i in range(layers)])


def _build_stage(gm: fx.GraphModule, i: int, stage_of: dict, results: set, num_layers: int, name: str,
                 batched: set[str]) -> Stage:
    """Stage i's GraphModule. A size (SymInt) made by an earlier stage is re-read from the shape of one of the
    stage's tensor inputs, so a stage takes and returns tensors only and exports on its own."""
    graph, env = fx.Graph(), {}
    mine = [n for n in gm.graph.nodes if stage_of.get(n) == i and n.op != "get_attr"]
    external = {x: None for n in mine for x in n.all_input_nodes  # an ordered set
                if stage_of.get(x) != i or x.op == "get_attr"}
    sizes = [x for x in external if x.op not in ("placeholder", "get_attr") and _is_size(x)]
    tensors = [x for x in external if x.op != "get_attr" and x not in sizes]
    for x in tensors:  # produced by an earlier stage, or a program input
        env[x] = graph.placeholder(x.name)
        env[x].meta = dict(x.meta)
    for x in external:
        if x.op == "get_attr":  # weights are read from the shared root module
            env[x] = graph.node_copy(x)
    for size in sizes:
        src = next(((t, d) for t in tensors if isinstance(t.meta.get("val"), torch.Tensor)
                    for d, s in enumerate(t.meta["val"].shape) if same_size(s, size.meta["val"])), None)
        if src is None:
            raise RuntimeError(f"stage {i} reads the size {size.name} but none of its tensor inputs has it")
        env[size] = graph.call_function(torch.ops.aten.sym_size.int, (env[src[0]], src[1]))
        env[size].meta = dict(size.meta)
    for n in mine:
        env[n] = graph.node_copy(n, lambda x: env[x])
    outputs = [n for n in mine if n in results or (
        not _is_size(n) and any(stage_of.get(u, num_layers) > i for u in n.users))]
    graph.output(tuple(env[n] for n in outputs))
    module = fx.GraphModule(gm, graph)
    names = [x.name for x in tensors]
    return Stage(name, module, names, [n.name for n in outputs], [n in batched for n in names],
                 symbolic_dims(module))


# -- example inputs of every stage ---------------------------------------------------------------------------
def run_stage(stage: Stage, env: dict) -> None:
    env.update(zip(stage.outputs, stage.module(*[env[n] for n in stage.inputs])))


def stage_examples(plan: StagePlan, examples: tuple) -> dict[int, Callable[[], tuple]]:
    """Per stage (by id): a function giving real example inputs for it, made by running the eager stages before
    it on the program's example inputs (base graph up to the branch, then the branch)."""

    def make(graph: StagedGraph, upto: int) -> Callable[[], tuple]:
        def run() -> tuple:
            env = dict(zip(plan.base.placeholders, examples))
            with torch.no_grad():
                for j in range(upto):
                    run_stage(graph.stages[j], env)
            return tuple(env[n] for n in graph.stages[upto].inputs)
        return run

    out = {}
    for g in (plan.base, *plan.branches.values()):
        for i, s in enumerate(g.stages):
            out.setdefault(id(s), make(g, i))
    return out
