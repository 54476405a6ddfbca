"""Head rewrite primitives: attention heads sliced out of a layer's weights, or a layer's attention removed.

slice_heads(program, {layer: keep}): each layer's attention runs only the query heads `keep` (original indices).
  - q_proj loses the rows of the removed heads, o_proj the matching input columns; k_proj / v_proj lose the rows of
    a k/v head only when every query head of its group is gone (GQA). The sliced weights are NEW tensors registered
    on the program's GraphModule: the user's model and every other program keep theirs.
  - The k/v given to SDPA are rebuilt from the layer's cached keys/values for the remaining query heads: as they are
    (one query head per k/v head: MHA), repeat_interleave(r) when every remaining k/v head serves r query heads, or
    index_select with a constant head map when the groups became uneven (e.g. heads 0,1 of group 0 and head 2 of
    group 1). The uneven case materialises one [B, H_q', S, hd] copy of K and of V - the same copy transformers'
    repeat_kv already makes for GQA; no matmul gets bigger and no extra FLOPs are spent.
  - Literal head counts in the layer's views/reshapes (transformers writes -1 there today, so usually none) are
    rewritten: a literal equal to the old head count on a head axis (never the last, head_dim, axis), or to
    old heads x head_dim on the last axis of a flattening reshape.
remove_attention(program, {layer: adapter or None}): the attention sub-block of a layer is deleted (no q/k/v/o, no
  SDPA): the residual add that received o_proj's output receives nothing, or a linear map of the layer's normed
  input (a closed-form stand-in for the skipped attention, fitted by the pass that removes it). The layer has no KV cache
  any more, so its cache outputs leave the prefill signature and the decode step has no cache for it.
Both keep the Program's per-layer head counts (q_heads, kv_heads, kept_heads) that the FLOPs report reads.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from ..errors import PassConfigError, UnsupportedModelError
from .graph import cleanup, layer_nodes, output_values, sdpa_node, set_outputs, tidy
from .program import Program, cache_source
from .signature import Signature

aten = torch.ops.aten
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}


@dataclass
class AttentionNodes:
    """The nodes of one layer's attention sub-block that head rewrites touch."""

    q: fx.Node  # the q/k/v/o projections (aten.linear)
    k: fx.Node
    v: fx.Node
    o: fx.Node
    sdpa: fx.Node
    residual_add: fx.Node  # residual + o_proj(...)


def _linear(gm: fx.GraphModule, layer: int, role: str) -> fx.Node:
    found = [n for n in layer_nodes(gm, layer, role) if n.target is aten.linear.default]
    if len(found) != 1:
        raise UnsupportedModelError(f"layer {layer} has {len(found)} {role} linear nodes, expected 1; head slicing "
                                    "supports Llama-style attention (separate q/k/v/o projections)")
    return found[0]


def attention_nodes(gm: fx.GraphModule, layer: int) -> AttentionNodes:
    q, k, v, o = (_linear(gm, layer, role) for role in ("q_proj", "k_proj", "v_proj", "o_proj"))
    adds = [u for u in o.users if u.target is aten.add.Tensor and u.meta.get("vt_role") == "residual"]
    if len(adds) != 1:
        raise UnsupportedModelError(f"layer {layer}'s o_proj output does not feed one residual add; the attention "
                                    "sub-block cannot be removed from this model")
    return AttentionNodes(q, k, v, o, sdpa_node(gm, layer), adds[0])


def tensor_of(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a get_attr node reads (a weight of the program)."""
    if node.op != "get_attr":
        raise UnsupportedModelError(f"weight {node.name} is not a graph attribute (op {node.op}); cannot slice it")
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def _add_attr(gm: fx.GraphModule, hint: str, tensor: torch.Tensor, after: fx.Node, parameter: bool = True) -> fx.Node:
    """Register `tensor` on the program's GraphModule under a fresh name and read it with a get_attr after `after`."""
    name, i = f"vt_{hint}", 0
    while hasattr(gm, name):
        i += 1
        name = f"vt_{hint}_{i}"
    if parameter:
        gm.register_parameter(name, nn.Parameter(tensor.detach().clone().contiguous(), requires_grad=False))
    else:
        gm.register_buffer(name, tensor.detach().clone().contiguous())
    with gm.graph.inserting_after(after):
        node = gm.graph.get_attr(name)
    node.meta.update(vt_layer=-1, vt_pos=-1, vt_role="other")
    return node


def _slice(gm: fx.GraphModule, node: fx.Node, dim: int, index: torch.Tensor, hint: str) -> fx.Node:
    t = tensor_of(gm, node)
    return _add_attr(gm, hint, t.index_select(dim, index.to(t.device)), node)


def _rows(positions: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([p * head_dim + i for p in positions for i in range(head_dim)], dtype=torch.long)


def _slice_linear(gm: fx.GraphModule, lin: fx.Node, rows: torch.Tensor, hint: str, columns: bool = False) -> None:
    """Keep `rows` of a linear's output features (its weight rows and bias), or with columns=True its input features."""
    lin.update_arg(1, _slice(gm, lin.args[1], 1 if columns else 0, rows, f"{hint}_weight"))
    if not columns and len(lin.args) > 2 and isinstance(lin.args[2], fx.Node):
        lin.update_arg(2, _slice(gm, lin.args[2], 0, rows, f"{hint}_bias"))


def kv_map(keep: tuple[int, ...], group: int) -> tuple[list[int], list[int]]:
    """The k/v heads the query heads `keep` need (original indices) and, per kept query head, the position of its
    k/v head among those."""
    kv = sorted({h // group for h in keep})
    return kv, [kv.index(h // group) for h in keep]


def _expand_kv(gm: fx.GraphModule, src: fx.Node, mapping: list[int], layer: int, hint: str) -> fx.Node:
    """[B, H_kv', S, hd] -> [B, len(mapping), S, hd] with head i = src head mapping[i] (mapping non-decreasing)."""
    graph = gm.graph
    if mapping == list(range(len(mapping))):
        return src
    counts = Counter(mapping)
    if len(set(counts.values())) == 1:
        node = graph.call_function(aten.repeat_interleave.self_int, (src, next(iter(counts.values())), 1))
    else:
        first = next(n for n in graph.nodes if n.op != "placeholder")
        index = _add_attr(gm, f"{hint}_head_map", torch.tensor(mapping, dtype=torch.long,
                                                                device=src.meta["val"].device),
                          first.prev, parameter=False)
        node = graph.call_function(aten.index_select.default, (src, 1, index))
    node.meta.update(vt_layer=layer, vt_pos=float(layer), vt_role="attn")
    return node


def _rewrite_head_constants(gm: fx.GraphModule, layer: int, nodes: AttentionNodes, q: tuple[int, int],
                            kv: tuple[int, int], head_dim: int) -> int:
    """Literal head counts in the layer's attention reshapes: (old, new) for the query side (q and SDPA output) and
    the k/v side. Returns how many literals were rewritten."""
    side: dict[fx.Node, str] = {nodes.q: "q", nodes.k: "kv", nodes.v: "kv", nodes.sdpa: "q"}
    changed = 0
    for n in gm.graph.nodes:
        if n.meta.get("vt_pos") != layer or n in side or n.op != "call_function" or n is nodes.o:
            continue  # o_proj's output is [B, S, D] again: nothing after it has a head axis
        sides = {side[x] for x in n.all_input_nodes if x in side}
        if len(sides) != 1:
            continue
        side[n] = s = sides.pop()
        old, new = q if s == "q" else kv
        if n.target not in _RESHAPES or old == new or not isinstance(n.args[1], (list, tuple)):
            continue
        shape, last = list(n.args[1]), len(n.args[1]) - 1
        for i, x in enumerate(shape):
            if isinstance(x, int) and not isinstance(x, bool):
                if i == last and x == old * head_dim and x != -1:
                    shape[i], changed = new * head_dim, changed + 1
                elif i != last and x == old:
                    shape[i], changed = new, changed + 1
        n.update_arg(1, shape)
    return changed


def slice_heads(program: Program, keep: dict, by: str = "?") -> Program:
    """Run only the query heads keep[layer] (original indices) in each given layer's attention (module docstring).
    One shape refresh for all layers."""
    changed = [layer for layer, heads in sorted(keep.items()) if _slice_layer(program, layer, heads, by)]
    if not changed:
        return program
    try:
        cleanup(program.gm, program.fake_inputs)
    except Exception as exc:  # noqa: BLE001 - a shape that still holds an old head count
        raise UnsupportedModelError(f"{by}: after slicing the heads of layers {changed} the graph no longer "
                                    f"propagates shapes ({type(exc).__name__}: {exc}); a head count in this "
                                    "model's attention is not one head slicing knows how to rewrite") from exc
    return program


def _slice_layer(program: Program, layer: int, keep, by: str) -> bool:
    """The graph edit of slice_heads for one layer (no shape refresh); False if nothing changes."""
    gm, g = program.gm, program.geometry
    if not 0 <= layer < g.num_layers:
        raise PassConfigError(f"{by}: layer {layer} does not exist; this decoder has layers 0..{g.num_layers - 1}")
    if program.q_heads[layer] == 0:
        raise PassConfigError(f"{by}: layer {layer}'s attention was removed by an earlier pass; nothing to slice")
    current = program.kept_heads.get(layer, tuple(range(g.num_heads)))
    keep = tuple(sorted(set(int(h) for h in keep)))
    gone = [h for h in keep if h not in current]
    if gone:
        raise PassConfigError(f"{by}: heads {gone} of layer {layer} do not exist or were removed by an earlier pass; "
                              f"its attention runs query heads {list(current)}")
    if not keep:
        raise PassConfigError(f"{by}: removing every head of layer {layer} removes its attention; remove "
                              "the whole attention block instead (`vtcompile passes` lists the pass that does)")
    if keep == current:
        return False
    group, hd = g.num_heads // g.num_kv_heads, g.head_dim
    kv_now, _ = kv_map(current, group)
    kv_keep, mapping = kv_map(keep, group)
    nodes = attention_nodes(gm, layer)
    hint = f"l{layer}"
    _slice_linear(gm, nodes.q, _rows([current.index(h) for h in keep], hd), f"{hint}_q_proj")
    _slice_linear(gm, nodes.o, _rows([current.index(h) for h in keep], hd), f"{hint}_o_proj", columns=True)
    if kv_keep != kv_now:
        rows = _rows([kv_now.index(h) for h in kv_keep], hd)
        _slice_linear(gm, nodes.k, rows, f"{hint}_k_proj")
        _slice_linear(gm, nodes.v, rows, f"{hint}_v_proj")
    for arg, kind in ((1, "k"), (2, "v")):
        old = nodes.sdpa.args[arg]
        with gm.graph.inserting_before(nodes.sdpa):
            new = _expand_kv(gm, cache_source(old), mapping, layer, f"{hint}_{kind}")
        if new is not old:  # every reader of the repeated k/v (SDPA, a scorer) reads the new repeat
            old.replace_all_uses_with(new, delete_user_cb=lambda u: u is not new)
    tidy(gm)  # the old GQA repeat (with its literal head counts) is dead now
    _rewrite_head_constants(gm, layer, nodes, (len(current), len(keep)), (len(kv_now), len(kv_keep)), hd)
    program.q_heads[layer], program.kv_heads[layer] = len(keep), len(kv_keep)
    program.kept_heads[layer] = keep
    return True


def remove_attention(program: Program, layers: dict, by: str = "?") -> Program:
    """Delete the attention sub-block of each layer in `layers` {layer: None or adapter (weight [D, D], bias [D])};
    with an adapter the attention output is replaced by linear(normed layer input, weight, bias) instead of nothing
    (module docstring). One shape refresh for all layers."""
    gm, g = program.gm, program.geometry
    drop, removed = set(), {}
    for layer, adapter in sorted(layers.items()):
        if not 0 <= layer < g.num_layers:
            raise PassConfigError(f"{by}: layer {layer} does not exist; this decoder has layers "
                                  f"0..{g.num_layers - 1}")
        if program.q_heads[layer] == 0:
            raise PassConfigError(f"{by}: layer {layer}'s attention was already removed")
        nodes = removed[layer] = attention_nodes(gm, layer)
        add = nodes.residual_add
        if adapter is None:
            residual = next(a for a in add.args if a is not nodes.o)
            add.replace_all_uses_with(residual)
        else:
            weight, bias = adapter
            x = nodes.q.args[0]  # the normed input the attention read
            ref = nodes.q.args[1]
            w = _add_attr(gm, f"l{layer}_attn_adapter_weight", weight.to(tensor_of(gm, ref)), ref)
            b = _add_attr(gm, f"l{layer}_attn_adapter_bias", bias.to(tensor_of(gm, ref)), w)
            with gm.graph.inserting_before(add):
                lin = gm.graph.call_function(aten.linear.default, (x, w, b))
            lin.meta.update(vt_layer=layer, vt_pos=float(layer), vt_role="attn")
            add.replace_input_with(nodes.o, lin)
            program.adapted[layer] = adapter
        tidy(gm)
        if not nodes.sdpa.users:  # SDPA is a seeded op (dropout), which dead-code elimination keeps
            gm.graph.erase_node(nodes.sdpa)
        drop |= {f"key_positions_{layer}", f"k_{layer}", f"v_{layer}"}
        program.q_heads[layer] = program.kv_heads[layer] = 0
        program.kept_heads[layer] = ()
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    values, slots = output_values(gm), out.meta.get("vt_slots")
    keep = [i for i, o in enumerate(program.signature.outputs) if o.name not in drop]
    set_outputs(gm, [values[i] for i in keep], [slots[i] for i in keep])
    program.signature = Signature(program.signature.inputs, tuple(program.signature.outputs[i] for i in keep))
    cleanup(gm, program.fake_inputs)
    left = set(gm.graph.nodes)
    for layer, nodes in removed.items():
        if nodes.q in left or nodes.k in left:
            # A token pass applied before (one that scores by attention) scores tokens with this layer's q/k: they would stay
            # in the graph while the FLOPs report counts the attention as gone.
            raise PassConfigError(f"{by}: layer {layer}'s q/k projections also feed the token scores of a pass "
                                  "applied before it (it scores tokens with that attention); remove "
                                  "another layer's attention, or list this pass first")
    return program


@torch.no_grad()
def last_token_logprobs(program: Program, batches) -> list[torch.Tensor]:
    """Log-probabilities of the next token at each calibration prompt's last position (where every row's prompt
    ends, with left padding), one tensor [B, vocab] per batch."""
    return [torch.log_softmax(program(*args)["logits"][:, -1].float(), -1) for args in batches]


def last_token_kl(reference: list[torch.Tensor], program: Program, batches) -> float:
    """Mean over the prompts of KL(reference || program) of the next-token distribution at the last position: how
    far a removal moves the model's prediction (the loss of the skip-set search of the attention and head passes)."""
    kl = [torch.nn.functional.kl_div(got, ref, log_target=True, reduction="none").sum(-1)
          for got, ref in zip(last_token_logprobs(program, batches), reference)]
    return float(torch.cat(kl).mean())
