"""The decode step: a second graph, derived from a program, that appends new tokens to per-layer KV caches.

Derived, not captured again, so every structural rewrite a pass made (sliced heads, removed attention) is in it
by construction, and only token selection - which never applies to new tokens - is undone:
  1. every value a token selection gathered (meta SELECTED_FROM) is replaced by the value it gathered from, so
     the selections, their scorers and their gathers become dead code;
  2. each layer's SDPA gets its own cache: the new keys (after RoPE) and values are written in place into
     k_cache.l / v_cache.l [B, H_kv, C_l, hd] at slots write_index[l] + 0..T-1, and the new tokens' sequence
     indices (query_index [B, T]) into key_index.l [B, C_l], the ORIGINAL sequence index of the key in each slot
     (-1: an empty slot or padding). The attention reads the whole cache (GQA heads repeated from it) under the
     layer's attention rule applied to those indices (compiler.attention.key_visible: causal, and the layer's
     sliding window counted in original indices as transformers counts it), so a pruned cache, a slot layout
     that differs between rows and a window all come out of one comparison;
  3. the graph returns the logits of the new tokens only.
This is the static-cache recipe of gpt-fast and Torch-TensorRT's static_cache_v2 pass (one SDPA, its own K/V
inputs), with per-layer cache lengths: a layer that kept fewer tokens in prefill has a shorter cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from .attention import emit_key_visible
from .graph import FakeInputs, output_values, refresh_meta, sdpa_node, set_outputs, tidy
from .program import Program, _copy_graph_module, cache_source
from .rewrite import SELECTED_FROM
from .signature import END, Signature, decode_signature
from .staged import Stage, stem

aten = torch.ops.aten


@dataclass
class DecodeGraph:
    stage: Stage  # the step as a stage (inputs in decode-signature order)
    signature: Signature
    layers: list[int]  # layers with a cache (attention)
    cache_shapes: dict[int, tuple[int, int]]  # layer -> (kv heads, head dim), read from the graph
    dtype: torch.dtype
    hidden_size: int
    position_axes: int = 1  # RoPE position axes per token (3: M-RoPE, position_ids [B, T, 3])

    @property
    def gm(self) -> fx.GraphModule:
        return self.stage.module

    def example_inputs(self, batch: int = 3, prompt: int = 7, new: int = 5) -> tuple[torch.Tensor, ...]:
        """Real inputs for tracing/exporting the step: every layer's cache has a length of its own (so that no
        two lengths are unified into one symbol when a later prompt gives them other lengths)."""
        return example_decode_inputs(self.layers, self.cache_shapes, self.dtype, self.hidden_size, batch, prompt, new,
                                     self.position_axes)

    def info(self) -> dict:
        info = {"layers": list(self.layers), "cache_shapes": {str(k): list(v) for k, v in self.cache_shapes.items()},
                "dtype": str(self.dtype).replace("torch.", ""), "hidden_size": self.hidden_size}
        if self.position_axes != 1:
            info["position_axes"] = self.position_axes
        return info


def example_decode_inputs(layers, cache_shapes, dtype, hidden_size: int, batch: int = 3, prompt: int = 7,
                          new: int = 5, position_axes: int = 1) -> tuple[torch.Tensor, ...]:
    position = torch.full((batch, 1) if position_axes == 1 else (batch, 1, position_axes), prompt, dtype=torch.long)
    out = [torch.zeros(batch, 1, hidden_size, dtype=dtype), position,
           torch.full((batch, 1), prompt + 1, dtype=torch.long), torch.zeros(len(layers), dtype=torch.long)]
    for i, layer in enumerate(layers):
        heads, dim = cache_shapes[layer]
        length = prompt + new + 2 * i
        index = torch.arange(length).expand(batch, length).clone()
        index[:, prompt:] = -1  # slots not written yet
        out += [torch.zeros(batch, heads, length, dim, dtype=dtype), torch.zeros(batch, heads, length, dim, dtype=dtype),
                index]
    return tuple(out)


def decode_dynamic_dims(layers) -> list[tuple[int, ...]]:
    """Per decode input: the dims that stay symbolic (batch, and each cache's length)."""
    return [(0,), (0,), (0,), ()] + [(0, 2), (0, 2), (0, 1)] * len(layers)


def _undo_selections(gm: fx.GraphModule) -> None:
    by_name = {n.name: n for n in gm.graph.nodes}
    for n in reversed(list(gm.graph.nodes)):  # latest first: a later cut gathers an earlier cut's result
        source = n.meta.get(SELECTED_FROM)
        if source is not None:
            n.replace_all_uses_with(by_name[source])


def _tag(node: fx.Node, layer: int) -> fx.Node:
    node.meta.update(vt_layer=layer, vt_pos=layer, vt_role="cache")
    return node


def decode_graph(program: Program, in_place: bool = True) -> DecodeGraph:
    """The decode step of `program` (see the module docstring). in_place=False gives the functional form for
    backends without input mutation (ONNX): the caches are written out of place and returned after the logits
    (outputs k_cache_l, v_cache_l, key_index_l), and the runtime keeps the returned tensors."""
    gm = _copy_graph_module(program.gm)
    _undo_selections(gm)
    graph = gm.graph
    old_inputs = [n for n in graph.nodes if n.op == "placeholder"]
    embeds, position_ids = old_inputs[0], old_inputs[2]
    layers = program.signature.cache_layers()
    first = next(n for n in graph.nodes if n.op != "placeholder")
    with graph.inserting_before(first):
        query_index = graph.placeholder("query_index")
        write_index = graph.placeholder("write_index")
        caches = {}
        for layer in layers:
            caches[layer] = tuple(graph.placeholder(f"{kind}_{layer}") for kind in ("k_cache", "v_cache", "key_index"))
    shapes, written = {}, {}
    for layer in layers:
        sdpa = sdpa_node(gm, layer)
        args = list(sdpa.args) + [None] * 8
        q, k_new, v_new = args[0], cache_source(args[1]), cache_source(args[2])
        scale = sdpa.kwargs.get("scale", args[6])
        k_cache, v_cache, key_index = caches[layer]
        q_heads, kv_heads = q.meta["val"].shape[1], k_new.meta["val"].shape[1]
        shapes[layer] = (int(kv_heads), int(k_new.meta["val"].shape[3]))
        with graph.inserting_before(sdpa):
            def emit(target, *a, **kw):
                return _tag(graph.call_function(target, a, kw), layer)

            new_tokens = emit(aten.sym_size.int, q, 2)
            base = emit(aten.select.int, write_index, 0, layers.index(layer))
            slots = emit(aten.add.Tensor, emit(aten.arange.default, new_tokens, dtype=torch.long,
                                               device=_device(q)), base)  # [T]
            write = aten.index_copy_.default if in_place else aten.index_copy.default
            k_all = emit(write, k_cache, 2, slots, k_new)
            v_all = emit(write, v_cache, 2, slots, v_new)
            index_all = emit(write, key_index, 1, slots, query_index)  # [B, C]
            written[layer] = (k_all, v_all, index_all)
            keys = emit(aten.unsqueeze.default, emit(aten.unsqueeze.default, index_all, 1), 1)  # [B, 1, 1, C]
            queries = emit(aten.unsqueeze.default, emit(aten.unsqueeze.default, query_index, 1), 3)  # [B, 1, T, 1]
            mask = emit_key_visible(emit, queries, keys, program.geometry.window(layer))  # [B, 1, T, C]
            group = int(q_heads) // int(kv_heads)
            if group > 1 and _plain_gqa(args[1]) and _plain_gqa(args[2]):
                # GQA without copying the cache: query head h reads k/v head h // group (repeat_kv's order), so the
                # group's queries become rows of one k/v head: [B, H, T, hd] -> [B, H_kv, group * T, hd]
                rows = emit(aten.flatten.using_ints, emit(aten.unflatten.int, q, 1, [int(kv_heads), group]), 2, 3)
                wide = emit(aten.expand.default, emit(aten.unsqueeze.default, mask, 2), [-1, -1, group, -1, -1])
                out = emit(aten.scaled_dot_product_attention.default, rows, k_all, v_all,
                           emit(aten.flatten.using_ints, wide, 2, 3), 0.0, False, scale=scale)
                out.meta["vt_role"] = "sdpa"
                new = emit(aten.flatten.using_ints, emit(aten.unflatten.int, out, 2, [group, -1]), 1, 2)
            else:
                k_all, v_all = (_repeat_heads(emit, args[i], x, int(q_heads), int(kv_heads))
                                for i, x in ((1, k_all), (2, v_all)))
                new = emit(aten.scaled_dot_product_attention.default, q, k_all, v_all, mask, 0.0, False, scale=scale)
                new.meta["vt_role"] = "sdpa"
        sdpa.replace_all_uses_with(new)
        graph.erase_node(sdpa)
    logits = output_values(gm)[0]
    returned = [] if in_place else [t for layer in layers for t in written[layer]]
    set_outputs(gm, [logits] + returned, [END] * (1 + len(returned)))
    for n in list(graph.nodes):  # export's dtype/device asserts keep the prompt's mask inputs alive
        if n.op == "call_function" and n.target is aten._assert_tensor_metadata.default:
            graph.erase_node(n)
    tidy(gm)
    for n in old_inputs:
        if n is not embeds and n is not position_ids and not n.users:
            graph.erase_node(n)
    # Placeholders in signature order: inputs_embeds, position_ids, write_index, then the caches
    order = [embeds, position_ids, query_index, write_index] + [c for layer in layers for c in caches[layer]]
    head = next(iter(graph.nodes))
    for n in reversed(order):
        if n is not head:
            head.prepend(n)
        head = n
    for n in order:
        n.meta.update(vt_layer=-1, vt_pos=-1, vt_role="other")
    tidy(gm)
    sig = decode_signature(layers, in_place)
    dtype, hidden = embeds.meta["val"].dtype, int(embeds.meta["val"].shape[-1])
    axes = program.geometry.position_axes
    dims = decode_dynamic_dims(layers)
    refresh_meta(gm, FakeInputs(list(example_decode_inputs(layers, shapes, dtype, hidden, position_axes=axes)), dims))
    stage = Stage(f"{stem(program)}-decode", gm, list(sig.inputs), sig.output_names, [True, True, True, False] +
                  [True] * (3 * len(layers)), dims, role="decode")
    return DecodeGraph(stage, sig, layers, shapes, dtype, hidden, axes)


def _plain_gqa(prefill_arg: fx.Node) -> bool:
    """The prefill repeats k/v heads as transformers' repeat_kv does (not a head slicing's repeat or head map)."""
    return prefill_arg.target not in (aten.index_select.default, aten.repeat_interleave.self_int)


def _repeat_heads(emit, prefill_arg: fx.Node, cache: fx.Node, q_heads: int, kv_heads: int) -> fx.Node:
    """The cache's k/v heads repeated for the query heads as the prefill graph repeats them: a head slicing
    (compiler.heads) leaves a repeat_interleave or, for uneven groups, an index_select with its head map; the
    captured graph's GQA repeat is r = q_heads / kv_heads copies of each head."""
    if prefill_arg.target is aten.index_select.default:
        return emit(aten.index_select.default, cache, 1, prefill_arg.args[2])
    if prefill_arg.target is aten.repeat_interleave.self_int:
        return emit(aten.repeat_interleave.self_int, cache, prefill_arg.args[1], 1)
    if q_heads != kv_heads:
        return emit(aten.repeat_interleave.self_int, cache, q_heads // kv_heads, 1)
    return cache


def _device(node: fx.Node) -> torch.device:
    return node.meta["val"].device
