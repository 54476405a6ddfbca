"""Running a StagePlan: the stages in order, the decision between them, rows regrouped where they branch.

A plan without a decision runs its one stage. With one (compiler.branches), after each layer it is asked about,
the rows it picks leave the base graph and continue in that layer's branch graph (stages after the layer); the
results of every row group are put back together by name, rows that kept fewer positions left-padded along each
output's token axis (compiler.signature: positions with -1, tensors with 0). So per-layer caches of rows that
branched at different layers come out as one batch with per-row validity (key_positions_l = -1 on padding).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..compiler.signature import Signature
from ..compiler.staged import StagedGraph, StagePlan, run_stage


@dataclass
class PrefillResult:
    values: dict[str, torch.Tensor]  # by signature output name
    exit_layers: list[int] | None  # with a decision: per row, the layer after which it branched (-1: none)


def _rows(graph: StagedGraph, batched: dict[str, bool], env: dict, rows: torch.Tensor) -> dict:
    """The values of a subset of batch rows."""
    return {k: v[rows] if batched.get(k, False) else v for k, v in env.items()}


class Executor:
    """Runs a plan whose stage modules are callables (eager FX modules or lowered stages)."""

    def __init__(self, plan: StagePlan):
        self.plan = plan
        # which values carry the batch on dim 0: every stage says it of its inputs, and every result does
        self.batched = {n: b for s in plan.all_stages() for n, b in zip(s.inputs, s.batched)}
        self.batched.update({n: True for g in (plan.base, *plan.branches.values()) for n in g.results})

    @torch.no_grad()
    def __call__(self, *args) -> PrefillResult:
        plan = self.plan
        env = dict(zip(plan.base.placeholders, args))
        if plan.decision is None:
            for s in plan.base.stages:
                run_stage(s, env)
            return PrefillResult(plan.signature.unpack(env[n] for n in plan.base.results), None)
        batch = args[0].shape[0]
        rows = torch.arange(batch, device=args[0].device)
        exit_at = torch.full((batch,), -1, dtype=torch.long)
        finished: list[tuple[torch.Tensor, dict]] = []
        layers = len(plan.base.stages)
        for layer in range(layers):
            if len(rows) == 0:  # every row has branched
                break
            run_stage(plan.base.stages[layer], env)
            if layer not in plan.branches:
                continue
            fire = plan.decision.decide(layer, env[plan.base.residual[layer]], env[plan.visual[layer]])
            if not bool(fire.any()):
                continue
            sel = fire.nonzero().squeeze(1).to(rows.device)
            sub = _rows(plan.base, self.batched, env, sel)
            branch = plan.branches[layer]
            for later in range(layer + 1, layers):
                run_stage(branch.stages[later], sub)
            finished.append((rows[sel], plan.signature.unpack(sub[n] for n in branch.results)))
            exit_at[rows[sel].cpu()] = layer
            keep = (~fire).nonzero().squeeze(1).to(rows.device)
            env, rows = _rows(plan.base, self.batched, env, keep), rows[keep]
        if len(rows):
            finished.append((rows, plan.signature.unpack(env[n] for n in plan.base.results)))
        return PrefillResult(merge_rows(finished, batch, plan.signature), exit_at.tolist())


def merge_rows(parts: list[tuple[torch.Tensor, dict]], batch: int, signature: Signature) -> dict:
    """Regroup row groups into one batch, left-padding each output along its token axis to the longest group."""
    if len(parts) == 1 and len(parts[0][0]) == batch and bool((parts[0][0].cpu() == torch.arange(batch)).all()):
        return parts[0][1]
    out = {}
    for spec in signature.outputs:
        vals = [(rows, p[spec.name]) for rows, p in parts]
        axis = spec.token_axis
        first = vals[0][1]
        if axis is None:
            out[spec.name] = first.new_empty((batch, *first.shape[1:]))
            for rows, v in vals:
                out[spec.name][rows] = v
            continue
        length = max(v.shape[axis] for _, v in vals)
        shape = list(first.shape)
        shape[0], shape[axis] = batch, length
        merged = first.new_full(shape, spec.fill)
        for rows, v in vals:
            index: list = [rows] + [slice(None)] * (len(shape) - 1)
            index[axis] = slice(length - v.shape[axis], length)
            merged[tuple(index)] = v
        out[spec.name] = merged
    return out
