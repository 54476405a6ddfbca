"""Token-removing rewrite primitives: every token-pruning pass is built from these.

select_tokens(program, cut, scorer, k_visual): from `cut` (compiler.cut: before a layer, or after its attention) on, keep the k_visual
highest-scoring visual tokens and every text/padding token. Keep indices have no data-dependent shape:
scores are forced to +inf at non-visual positions, topk takes k = S_cur - (visual_now - k_visual), and the
indices are sorted ascending (original order; position ids are gathered, so they stay the originals).
Then every live-in of the graph after the cut that carries the token axis (residual stream, RoPE cos/sin,
the 4-D mask on both axes, position/visual bookkeeping) is gathered and its later uses redirected; sym-int
live-ins equal to the token count are replaced by the new count.
"""
from __future__ import annotations

import math
import operator
from typing import Callable

import torch
import torch.fx as fx

from ..errors import PassConfigError, UnsupportedModelError
from .cut import Cut
from .graph import cleanup, live_ins, redirect_uses, same_size, tidy, token_axes
from .program import Program, Rewrite

aten = torch.ops.aten


class Emitter:
    """Appends aten calls to the graph at the current insertion point, tagged with position and role."""

    def __init__(self, graph: fx.Graph, pos: float, role: str):
        self.graph, self.pos, self.role = graph, pos, role
        self.layer = math.floor(pos)

    def tag(self, node: fx.Node) -> fx.Node:
        node.meta.update(vt_layer=self.layer, vt_pos=self.pos, vt_role=self.role)
        return node

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        return self.tag(self.graph.call_function(target, args, kwargs))

    def size(self, node: fx.Node, dim: int) -> fx.Node:
        return self(aten.sym_size.int, node, dim)


# A scorer emits nodes that compute a [B, S_cur] score (higher = keep) and returns the score node.
Scorer = Callable[[Emitter], fx.Node]


def _first_node_of(gm: fx.GraphModule, position: float) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.meta["vt_pos"] >= position)


def _gather_token_axes(emit: Emitter, x: fx.Node, axes: list[int], keep: fx.Node, batch: fx.Node) -> fx.Node:
    """x[b, ..., keep[b], ...] on each token axis, for every batch row b (dim 0 is the batch, size B or 1)."""
    val = x.meta["val"]
    rank = val.dim()
    if 0 in axes:
        raise UnsupportedModelError(f"value {x.name} has the token axis at dim 0; expected [batch, ...]")
    if isinstance(val.shape[0], int) and val.shape[0] == 1:  # broadcast over the batch: rows now differ
        x = emit(aten.expand.default, x, [batch] + [-1] * (rank - 1))
    for axis in axes:
        idx = emit(aten.view.default, keep, [batch if d == 0 else (-1 if d == axis else 1) for d in range(rank)])
        sizes = [batch if d == 0 else -1 if d == axis else val.shape[d] if isinstance(val.shape[d], int)
                 else emit.size(x, d) for d in range(rank)]
        x = emit(aten.gather.default, x, axis, emit(aten.expand.default, idx, sizes))
    return x


SELECTED_FROM = "vt_selected_from"  # meta key on a gathered value: the name of the value it selects tokens of


def select_tokens(program: Program, cut: "Cut | int", scorer: Scorer | None, k_visual: int,
                  by: str = "?") -> Program:
    """Keep k_visual visual tokens (by score) and all others from `cut` on.

    cut: a Cut, or a layer l for the cut before it (0: before the decoder, as pre-LLM selection does);
    Cut(l, after_attention=True) removes them after layer l's attention (they were still keys there) and before
    its MLP.
    """
    gm, geom = program.gm, program.geometry
    cut = Cut.at(cut)
    if not 0 <= cut.layer <= geom.num_layers - 1:
        raise PassConfigError(f"token selection {cut} is outside layers 0..{geom.num_layers - 1} (0 = before the "
                              f"decoder) of this {geom.num_layers}-layer decoder")
    if cut < program.last_cut:
        raise PassConfigError(
            f"pass {by!r} removes tokens {cut}, but an earlier pass already removed tokens "
            f"{program.last_cut}; list token-removing passes in increasing layer order")
    if scorer is not None and program.rewrites and cut == program.last_cut:
        # A scorer reads values from before the cut, which cover the tokens the earlier selection there already
        # removed: its scores would not line up with the tokens left (composing them needs the earlier keep indices).
        earlier = program.rewrites[-1]
        raise PassConfigError(
            f"pass {by!r} removes tokens {cut}, where pass {earlier.by!r} already removed tokens; two scored "
            f"selections at one cut do not compose. Give one pass a stronger setting instead (one {by} "
            f"removing a larger share), or make the second cut a later layer (before layer {cut.layer + 1} "
            "or after)")
    visual_now = program.visual_at(cut)
    if not 0 <= k_visual <= visual_now:
        raise PassConfigError(f"cannot keep {k_visual} visual tokens {cut}: {visual_now} are present there")
    if k_visual == visual_now:
        return program  # nothing removed: the graph stays as it is
    if program.meta is not None:
        # Everything read below lies before the cut, or in the layer after it (a cloning scorer's q/k).
        program.meta.refresh(upto=cut.layer + 1)
    n_cur = program.token_count()
    inputs = live_ins(gm, cut.position)
    graph = gm.graph
    emit = Emitter(graph, cut.emit_position, "select")
    with graph.inserting_before(_first_node_of(gm, cut.position)):
        positions = program.positions_node
        vis = program.visual_mask_node
        batch = emit.size(positions, 0)
        count = emit.size(positions, 1)
        if scorer is None:
            score = emit(aten.zeros_like.default, positions, dtype=torch.float32)
        else:
            score = emit(aten._to_copy.default, scorer(emit), dtype=torch.float32)
        forced = emit(aten.where.ScalarOther, vis, score, float("inf"))
        k = emit(operator.sub, count, visual_now - k_visual)
        top = emit(aten.topk.default, forced, k, 1)
        top_idx = emit(operator.getitem, top, 1)
        keep = emit(operator.getitem, emit(aten.sort.default, top_idx, 1), 0)
        replaced: dict[fx.Node, fx.Node] = {}
        sym_liveins = []
        for x in inputs:
            val = x.meta.get("val")
            if isinstance(val, torch.SymInt):
                if same_size(val, n_cur):
                    sym_liveins.append(x)
                elif val.node.expr.free_symbols & n_cur.node.expr.free_symbols:
                    raise UnsupportedModelError(
                        f"value {x.name} is a size derived from the token count ({val}); cannot prune across it")
                continue
            axes = token_axes(x, n_cur)
            if not axes:
                continue
            replaced[x] = _gather_token_axes(emit, x, axes, keep, batch)
            replaced[x].meta[SELECTED_FROM] = x.name
        new_positions = replaced.get(positions)
        if new_positions is None:
            raise UnsupportedModelError("the positions output is not a live-in of the pruned layers")
        new_count = emit.size(new_positions, 1)
        for x in sym_liveins:
            replaced[x] = new_count
    for old, new in replaced.items():
        redirect_uses(old, new, cut.position)
    if program.meta is not None:
        tidy(gm)
        program.meta.invalidate_from(emit.pos)
    else:
        cleanup(gm, program.fake_inputs)
    program.schedule = [k_visual if cut.removes_from_attention(layer) else v
                        for layer, v in enumerate(program.schedule)]
    program.mlp_schedule = [k_visual if cut.removes_from_mlp(layer) else v
                            for layer, v in enumerate(program.mlp_schedule)]
    program.rewrites.append(Rewrite(cut, visual_now, k_visual, by, new_positions.name, replaced[vis].name))
    return program


def drop_visual(program: Program, layer: int, by: str = "?") -> Program:
    """Remove every visual token from decoder layer `layer` on (visual-token exit)."""
    return select_tokens(program, Cut(layer), None, 0, by=by)
