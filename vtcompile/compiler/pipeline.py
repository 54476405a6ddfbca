"""The pass manager: applies passes in the listed order, verifies the graph after each, and names the
failing pass and the ones applied before it."""
from __future__ import annotations

import torch

from ..errors import PassFailedError, VtcompileError
from .graph import SDPA, count_ops, layer_nodes, same_size
from .program import Captured, Program


def verify(program: Program, sdpa_count: int) -> None:
    """Graph-level invariants every pass must keep (beyond lint and fresh metadata from cleanup)."""
    gm = program.gm
    gm.graph.lint()
    found = count_ops(gm, SDPA)
    removed = sum(1 for h in program.q_heads if h == 0)  # attention sub-blocks removed (compiler.heads)
    if found != sdpa_count - removed:
        raise AssertionError(f"{found} SDPA nodes after the pass, expected {sdpa_count - removed}")
    seq = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["val"].shape[1]
    for layer in range(program.geometry.num_layers):
        sdpa = layer_nodes(gm, layer, "sdpa")
        if not sdpa:
            continue
        q_tokens = sdpa[0].args[0].meta["val"].shape[2]
        heads = sdpa[0].args[0].meta["val"].shape[1]
        if heads != program.q_heads[layer]:
            raise AssertionError(f"layer {layer} attends with {heads} query heads, the program says "
                                 f"{program.q_heads[layer]}")
        expect = seq - (program.n_visual - program.schedule[layer])
        if not same_size(q_tokens, expect):
            raise AssertionError(f"layer {layer} attends over {q_tokens} tokens, the schedule says {expect}")
        mlp = [n for n in layer_nodes(gm, layer, "mlp") if n.target is torch.ops.aten.linear.default]
        if mlp:
            mlp_tokens = mlp[0].meta["val"].shape[1]
            expect = seq - (program.n_visual - program.mlp_schedule[layer])
            if not same_size(mlp_tokens, expect):
                raise AssertionError(f"layer {layer}'s MLP runs on {mlp_tokens} tokens, the schedule says {expect}")


def build_program(captured: Captured, n_visual: int, passes: list, recipes: dict | None = None) -> Program:
    """A Program for `n_visual` visual tokens per row with `passes` [(PassDef, config), ...] applied."""
    program = Program.from_captured(captured, n_visual)
    sdpa_count = count_ops(program.gm, SDPA)
    recipes = recipes or {}
    for i, (p, config) in enumerate(passes):
        before = [q.name for q, _ in passes[:i]]
        try:
            p.check_supports(program.geometry)
            config.check_model(program.geometry)
            program = p.apply(program, config, recipes.get(p.name))
            if program.branches is not None and p.rewrites_layers:
                # a row that branches must run the same layers as one that does not
                branches = program.branches.programs
                for e in sorted(branches):
                    branches[e] = p.apply(branches[e], config, recipes.get(p.name))
            verify(program, sdpa_count)
        except VtcompileError:
            raise
        except Exception as exc:  # noqa: BLE001 - re-raised with the pipeline position
            raise PassFailedError(
                f"pass {p.name!r} failed (applied before it: {', '.join(before) or 'none'}): "
                f"{type(exc).__name__}: {exc}") from exc
        program.applied.append(p.name)
    return program
