"""Staged programs: a decoder graph split into one stage per layer, with exit continuations.

Dynamic decisions (DyVTE's visual-token exit) need control flow between layers. The graph is split at every
layer boundary (torch.fx split_module, partitioned by the vt_pos annotation); every stage has static token
counts given the sequence length, so each one compiles and exports on its own. An exit continuation for
layer e is the same program with every visual token dropped before layer e + 1 (compiler.rewrite.drop_visual);
its stages 0..e are the base program's, so the runtime switches graphs at the boundary by value name,
without recomputing anything. The decision itself is a callback on the residual stream after a layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from .graph import output_values, same_size
from .program import Program


def _stage_of(node: fx.Node, num_layers: int) -> int:
    # Nodes a rewrite inserts for cut b sit at b - 0.25: they open stage b (they belong to the continuation).
    return max(0, min(num_layers - 1, math.floor(node.meta.get("vt_pos", -1) + 0.25)))


@dataclass
class Stage:
    module: fx.GraphModule
    inputs: list[str]  # names (in the whole program's graph) of the values the stage reads
    outputs: list[str]  # names of the values it produces for later stages or the results


def _split(gm: fx.GraphModule, num_layers: int) -> list[Stage]:
    """One GraphModule per layer; values cross stages under their original node names, tensors only."""
    stage_of = {n: _stage_of(n, num_layers) for n in gm.graph.nodes if n.op not in ("output", "placeholder")}
    results = set(output_values(gm))
    return [_build_stage(gm, i, stage_of, results, num_layers) for i in range(num_layers)]


def _is_size(x: fx.Node) -> bool:
    return isinstance(x.meta.get("val"), torch.SymInt)


def _build_stage(gm: fx.GraphModule, i: int, stage_of: dict, results: set, num_layers: int) -> Stage:
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
    return Stage(fx.GraphModule(gm, graph), [x.name for x in tensors], [n.name for n in outputs])


@dataclass
class StagedGraph:
    """One program split into per-layer stages that exchange values by node name."""

    stages: list[Stage]
    placeholders: list[str]
    results: list[str]  # (logits, positions, visual) node names
    residual: list[str]  # per layer: the node holding the residual stream after that layer
    batched: set[str]  # values with the batch on dim 0 (sliced when rows are regrouped)

    @classmethod
    def from_program(cls, program: Program) -> "StagedGraph":
        gm, layers = program.gm, program.geometry.num_layers
        stages = _split(gm, layers)
        residual = []
        for i in range(layers):
            adds = [n for n in gm.graph.nodes if n.meta.get("vt_layer") == i and n.meta.get("vt_role") == "residual"
                    and n.target is torch.ops.aten.add.Tensor]
            residual.append(adds[-1].name)
        batch = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[0]
        batched = {n.name for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)
                   and n.meta["val"].dim() and same_size(n.meta["val"].shape[0], batch)}
        return cls(stages, [n.name for n in gm.graph.nodes if n.op == "placeholder"],
                   [n.name for n in output_values(gm)], residual, batched)

    def run_stage(self, i: int, env: dict) -> None:
        stage = self.stages[i]
        out = stage.module(*[env[n] for n in stage.inputs])
        env.update(zip(stage.outputs, out))


def _rows(graph: StagedGraph, env: dict, rows: torch.Tensor) -> dict:
    """The values of a subset of batch rows (stages exchange tensors only; sizes are read from them)."""
    return {k: v[rows] if k in graph.batched else v for k, v in env.items()}


@dataclass
class ExitProgram:
    """A base program plus text-only continuations after candidate exit layers and a decision rule."""

    base: StagedGraph
    exits: dict[int, StagedGraph]  # exit after layer e -> program with visual tokens dropped before e + 1
    decide: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]  # (layer, residual, visual) -> [B] bool
    visual_names: dict[int, str]  # per exit layer: the visual-mask value live there
    last_exit: list[int] = field(default_factory=list)  # per row of the last call: exit layer or -1

    @torch.no_grad()
    def __call__(self, *args):
        env = dict(zip(self.base.placeholders, args))
        batch = args[0].shape[0]
        rows = torch.arange(batch, device=args[0].device)
        exit_at = torch.full((batch,), -1, dtype=torch.long)
        finished: list[tuple[torch.Tensor, tuple]] = []
        layers = len(self.base.stages)
        for layer in range(layers):
            if len(rows) == 0:  # every row has exited
                break
            self.base.run_stage(layer, env)
            if layer not in self.exits:
                continue
            fire = self.decide(layer, env[self.base.residual[layer]], env[self.visual_names[layer]])
            if not bool(fire.any()):
                continue
            sel = fire.nonzero().squeeze(1)
            sub = _rows(self.base, env, sel)
            cont = self.exits[layer]
            for later in range(layer + 1, layers):
                cont.run_stage(later, sub)
            finished.append((rows[sel], tuple(sub[n] for n in cont.results)))
            exit_at[rows[sel].cpu()] = layer
            keep = (~fire).nonzero().squeeze(1)
            env, rows = _rows(self.base, env, keep), rows[keep]
        if len(rows):
            finished.append((rows, tuple(env[n] for n in self.base.results)))
        self.last_exit = exit_at.tolist()
        return _merge_rows(finished, batch)


def _merge_rows(parts: list[tuple[torch.Tensor, tuple]], batch: int):
    """Regroup row groups of different lengths: left-pad to the longest (positions -1, logits 0)."""
    length = max(p[1][0].shape[1] for p in parts)
    logits0, pos0, vis0 = parts[0][1]
    logits = logits0.new_zeros(batch, length, logits0.shape[-1])
    positions = pos0.new_full((batch, length), -1)
    visual = vis0.new_zeros(batch, length)
    for rows, (lg, pos, vis) in parts:
        n = lg.shape[1]
        logits[rows, length - n:] = lg
        positions[rows, length - n:] = pos
        visual[rows, length - n:] = vis
    return logits, positions, visual


def exit_program(program: Program) -> ExitProgram:
    """Stage a program that carries exit continuations (see Program.exits)."""
    return ExitProgram(StagedGraph.from_program(program),
                       {e: StagedGraph.from_program(p) for e, p in sorted(program.exits.items())},
                       program.decide, {e: program.visual_name_at(e) for e in program.exits})
