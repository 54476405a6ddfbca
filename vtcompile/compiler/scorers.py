"""Token scorers: small subgraphs on tapped nodes. The attention itself stays SDPA.

A scorer reads existing values of the graph (the post-RoPE query and key a layer feeds to SDPA, the mask
it uses) and emits the few ops a method needs - never the full attention map, never output_attentions.
"""
from __future__ import annotations

import inspect
import math
import operator

import torch
import torch.fx as fx

from ..errors import PassConfigError, UnsupportedModelError
from .graph import layer_nodes, output_values, sdpa_node
from .program import Program
from .cut import Cut
from .rewrite import Emitter, Scorer, select_tokens
from .signature import PREFILL_INPUTS

aten = torch.ops.aten
_END = 2**62


def sdpa_arguments(node: fx.Node):
    """(query, key, mask, scale) node arguments of an SDPA call."""
    args = list(node.args) + [None] * 8
    mask = node.kwargs.get("attn_mask", args[3])
    return args[0], args[1], mask, node.kwargs.get("scale")


def _cone(targets: list[fx.Node], layer: int) -> set[fx.Node]:
    """The nodes of `layer` (vt_layer) that `targets` are computed from."""
    needed, stack = set(), list(targets)
    while stack:
        n = stack.pop()
        if n in needed or n.op != "call_function" or n.meta.get("vt_layer") != layer:
            continue
        needed.add(n)
        stack.extend(n.all_input_nodes)
    return needed


def clone_cone(e: Emitter, gm: fx.GraphModule, targets: list[fx.Node], layer: int,
               inputs: dict[fx.Node, fx.Node] | None = None) -> list[fx.Node]:
    """Copy the nodes of `layer` that compute `targets` to the insertion point, reading the layer's
    inputs as they are there (before any gather), or the replacements `inputs` gives for some of them. Lets a
    scorer use a later layer's projections (or the final norm on an earlier layer's states)."""
    needed = _cone(targets, layer)
    env: dict[fx.Node, fx.Node] = dict(inputs or {})
    for n in gm.graph.nodes:
        if n in needed:
            env[n] = e.tag(e.graph.node_copy(n, lambda x: env.get(x, x)))
    return [env.get(t, t) for t in targets]


def last_query_attention(program: Program, layer: int, clone: bool = False) -> Scorer:
    """Attention of the last input token's query over all keys in `layer`, averaged over heads.

    Recomputes one query row (q_last . K^T, scaled, masked, softmax) from the q/k that layer's SDPA
    consumes. The last position is the last prompt token for every row (prompts are left-padded).
    clone=True scores with a layer at or after the cut being made (the "next layer" of a pyramid schedule): its q/k
    projections are copied in front of the cut and fed the ungathered states.
    """

    def emit(e: Emitter) -> fx.Node:
        # The graph is read when the score is emitted (inside select_tokens, metadata fresh), not before.
        q_node, k_node, mask, scale = sdpa_arguments(sdpa_node(program.gm, layer))
        head_dim = q_node.meta["val"].shape[-1]
        scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
        heads = q_node.meta["val"].shape[1]
        kv_heads = k_node.meta["val"].shape[1]
        q, k = clone_cone(e, program.gm, [q_node, k_node], layer) if clone else (q_node, k_node)
        q_last = e(aten.slice.Tensor, q, 2, -1, _END)  # [B, H, 1, hd]
        keys = k
        if kv_heads != heads:  # SDPA called with enable_gqa: expand the kv heads for the score only
            keys = e(aten.repeat_interleave.self_int, keys, heads // kv_heads, 1)
        logits = e(aten.matmul.default, q_last, e(aten.transpose.int, keys, -2, -1))  # [B, H, 1, S]
        logits = e(aten.mul.Tensor, e(aten._to_copy.default, logits, dtype=torch.float32), scale)
        if mask is not None:
            row = e(aten.slice.Tensor, mask, 2, -1, _END)  # [B, 1, 1, S]
            if mask.meta["val"].dtype == torch.bool:
                logits = e(aten.where.ScalarOther, row, logits, float("-inf"))
            else:
                logits = e(aten.add.Tensor, logits, e(aten._to_copy.default, row, dtype=torch.float32))
        probs = e(aten._softmax.default, logits, -1, False)
        mean = e(aten.mean.dim, probs, [1, 2])  # head mean -> [B, S]
        return mean

    return emit


def final_norm(e: Emitter, program: Program, states: fx.Node) -> fx.Node:
    """The decoder's final norm applied to `states`, a residual-stream value [B, S, D] of some layer: the ops the
    graph runs between the last layer's output and the LM head's input, copied to the insertion point and fed
    `states` (hidden states as the head would read them, for scorers that compare hidden states)."""
    gm, last = program.gm, program.geometry.num_layers
    node = output_values(gm)[0]  # logits
    while not (node.op == "call_function" and node.target is aten.linear.default):
        inner = [a for a in node.all_input_nodes if a.meta.get("vt_layer") == last]
        if not inner:
            raise UnsupportedModelError("found no LM-head linear (aten.linear) behind the logits output; cannot "
                                        "read the decoder's final norm")
        node = inner[0]
    head_in = node.args[0]
    cone = _cone([head_in], last)
    outside = {a for n in cone for a in n.all_input_nodes
               if a not in cone and 0 <= a.meta.get("vt_layer", -1) < last}
    if not cone or len(outside) != 1:
        names = sorted(a.name for a in outside)
        raise UnsupportedModelError(f"the LM head's input should be the final norm of the last layer's output; it "
                                    f"reads {len(outside)} values of the decoder layers ({names})")
    return clone_cone(e, gm, [head_in], last, inputs={outside.pop(): states})[0]


def attention_states(program: Program, layer: int) -> dict[str, fx.Node]:
    """What `layer`'s attention works on: {"input": its normed input [B, S, D] (what q/k/v project), "query",
    "key", "value": the [B, heads, S, head_dim] tensors its SDPA reads (q and k after RoPE)}."""
    node = sdpa_node(program.gm, layer)
    q_proj = [n for n in layer_nodes(program.gm, layer, "q_proj") if n.target is aten.linear.default]
    if len(q_proj) != 1:
        raise UnsupportedModelError(f"layer {layer} has {len(q_proj)} q_proj linear nodes, expected 1")
    query, key, _, _ = sdpa_arguments(node)
    value = node.kwargs.get("value", node.args[2] if len(node.args) > 2 else None)
    return {"input": q_proj[0].args[0], "query": query, "key": key, "value": value}


def inline(e: Emitter, fn, args: list, **constants) -> fx.Node:
    """Trace a plain torch function (constants bound) and copy its ops to the insertion point.

    Lets a method's scoring math be written once as Python and used both in the graph and offline
    (calibration), so the two cannot drift apart.
    """
    names = [p for p in inspect.signature(fn).parameters if p not in constants]
    if len(names) != len(args):
        raise TypeError(f"inline({fn.__name__}): {len(args)} graph values for parameters {names}")
    namespace = {"fn": fn, "constants": constants}
    exec(f"def bound({', '.join(names)}):\n    return fn({', '.join(names)}, **constants)", namespace)
    traced = fx.symbolic_trace(namespace["bound"])
    env: dict[fx.Node, object] = {}
    inputs = iter(args)
    result = None
    for n in traced.graph.nodes:
        if n.op == "placeholder":
            env[n] = next(inputs)
        elif n.op == "output":
            result = fx.node.map_arg(n.args[0], lambda x: env[x])
        elif n.op == "get_attr":
            raise ValueError("inline() takes functions without parameters")
        else:
            env[n] = e.tag(e.graph.node_copy(n, lambda x: env[x]))
    return result


def text_after_images(visual: torch.Tensor) -> torch.Tensor:
    """[B, S] bool: the text tokens after the last image of each row (the instruction, in LLaVA prompts), from the
    visual mask. Shared by passes that read the instruction's states or attention; traceable (inline)."""
    seen = visual.long().cumsum(1)
    return (seen == seen[:, -1:]) & ~visual


def kept_per_image(keep: float, per_image: int) -> int:
    """Tokens a pre-LLM selection keeps of each image for a kept share `keep` (at least one)."""
    return max(1, int(round(keep * per_image)))


def check_before_llm(program: Program, name: str) -> None:
    """Pre-LLM selection (visual_selection) must come before every in-decoder cut."""
    if program.rewrites:
        raise PassConfigError(f"{name} selects visual tokens before the LLM, but {program.rewrites[-1].by!r} already "
                              f"removed tokens {program.rewrites[-1].cut}; list {name} before the passes that "
                              "remove tokens inside the decoder")


def image_sizes(geometry, n_visual: int) -> tuple[int, ...]:
    """The visual tokens of each image of a prompt row holding n_visual: whole images of the family's fixed count
    (fixed_image_tokens), or - dynamic resolution, where counts differ per image - one image of n_visual (a family
    without fixed counts provides image_groups only for rows of one image: models.family.FEATURES)."""
    if "fixed_image_tokens" not in geometry.features:
        return (n_visual,) if n_visual else ()
    per_image = geometry.visual_tokens_per_image
    if n_visual % per_image:
        raise ValueError(f"{n_visual} visual tokens are not whole images of {per_image}")
    return (per_image,) * (n_visual // per_image)


def before_llm_plan(keep: float, geometry, n_visual: int) -> list:
    """The schedule of a per-image selection before the LLM: at the cut before layer 0 each image keeps
    kept_per_image(keep, P) of its own P tokens."""
    return [(Cut(0), sum(kept_per_image(keep, p) for p in image_sizes(geometry, n_visual)))]


def select_before_llm(program: Program, name: str, keep: float, select, text: bool = False, **constants) -> Program:
    """The whole rewrite of a per-image selector pass: refused after an in-decoder cut, then each image keeps the
    kept_per_image(keep, P) tokens `select` picks (visual_selection, with `text` and `constants`) from layer 0 on."""
    check_before_llm(program, name)
    for cut, kept in before_llm_plan(keep, program.geometry, program.visual_at(0)):
        select_tokens(program, cut, visual_selection(program, select, keep, text=text, **constants), kept, by=name)
    return program


def visual_selection(program: Program, select, keep: float, text: bool = False, **constants) -> Scorer:
    """Selector form beside scorers: `select(feats, keep, **constants)` - a plain torch function (inlined, as the
    scorers' statistics are) - picks kept_per_image(keep, P) tokens of one image from that image's P projected
    visual tokens feats [rows, P, D] and returns their indices [rows, keep]; the scorer gives those tokens 1 and the
    image's other tokens 0, so select_tokens keeps exactly them (each image its own share, any image position,
    several images, batches). A selector with a `tokens` parameter gets P in it (a static size for its shapes).
    Reads the decoder's input embeddings: use it at the cut before layer 0.

    text=True: a selector conditioned on the prompt's text, `select(feats, text, text_mask, keep, **constants)`,
    also gets every row's input embeddings text [rows, S, D] (float32; at text positions: the LLM's token
    embeddings) and text_mask [rows, S] bool, True at the row's text tokens (neither an image token nor left
    padding, from the attention-mask input); every image of a row sees the same text.

    The selector is inlined once per image (the image count is static per executable): a reshape folding the
    images into the batch axis [rows x images, P, D] made Inductor guard the unbacked batch to the example's
    range (torch 2.13, `_dynamic_reshape_indexer`) and fail on other batch sizes with two images."""

    def emit(e: Emitter) -> fx.Node:
        placeholders = [n for n in program.gm.graph.nodes if n.op == "placeholder"]
        embeds = placeholders[0]
        vis = program.visual_mask_node
        n_vis = program.visual_at(0)
        sizes = image_sizes(program.geometry, n_vis)
        seq = e.size(vis, 1)
        position = e(aten._to_copy.default, e(aten.arange.default, seq, device=_device(vis)), dtype=torch.float32)
        # visual positions, ascending: the largest of -position over the visual tokens
        key = e(aten.where.ScalarOther, vis, e(aten.neg.default, position), float("-inf"))
        vis_idx = e(operator.getitem, e(aten.topk.default, key, n_vis, 1), 1)  # [B, n_vis]
        batch = e.size(vis, 0)
        dim = embeds.meta["val"].shape[-1]
        idx = e(aten.expand.default, e(aten.unsqueeze.default, vis_idx, 2), [batch, n_vis, dim])
        feats = e(aten._to_copy.default, e(aten.gather.default, embeds, 1, idx), dtype=torch.float32)
        context = []
        if text:
            padding = placeholders[PREFILL_INPUTS.index("attention_mask")]
            real = e(aten.ne.Scalar, padding, 0)
            context = [e(aten._to_copy.default, embeds, dtype=torch.float32),
                       e(aten.logical_and.default, real, e(aten.logical_not.default, vis))]
        marks, start = [], 0
        takes_tokens = "tokens" in inspect.signature(select).parameters
        for size in sizes:
            image = e(aten.slice.Tensor, feats, 1, start, start + size)  # [B, P, D]
            start += size
            sized = dict(constants, tokens=size) if takes_tokens else constants
            chosen = inline(e, select, [image, *context], keep=kept_per_image(keep, size), **sized)  # [B, keep]
            none = e(aten.zeros_like.default, e(aten.select.int, image, 2, 0))  # [B, P]
            marks.append(e(aten.scatter.value, none, 1, chosen, 1.0))
        marks = marks[0] if len(marks) == 1 else e(aten.cat.default, marks, 1)  # [B, n_vis]
        score = e(aten.zeros_like.default, vis, dtype=torch.float32)
        return e(aten.scatter.src, score, 1, vis_idx, marks)

    return emit


def _device(node: fx.Node) -> torch.device:
    return node.meta["val"].device
