"""The Program IR: a captured decoder graph plus what the rewrites did to it.

Capture splits the MLLM at its seams (vision stage, merge, decoder stage); the merge is data-dependent and
stays outside. The decoder stage is exported once with symbolic batch and sequence length; a Program is a
copy of that graph specialised to the number of visual tokens per row (every rewrite then has static
token counts given the sequence length S: kept = S - n_visual + k_visual).
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch import nn

from .branches import Branches
from .cut import Cut
from .geometry import Geometry
from .graph import (FakeInputs, IncrementalMeta, annotate, layer_nodes, output_values, refresh_meta, set_outputs,
                    uncached_fake_dispatch)
from .signature import END, Signature, prefill_signature

aten = torch.ops.aten


@dataclass(frozen=True)
class Rewrite:
    """One token-removing rewrite: at `cut`, visual tokens go from `before` to `after`."""

    cut: Cut
    before: int
    after: int
    by: str  # pass name
    positions: str = ""  # graph node holding the original positions kept from here on (for probes)
    visual: str = ""  # graph node holding the visual mask of the tokens kept from here on

    def to_dict(self) -> dict:
        return {**self.cut.to_dict(), "visual_before": self.before, "visual_after": self.after,
                "pass": self.by}


@dataclass
class Captured:
    """The exported decoder stage, before any pass (shared by every Program of a model)."""

    gm: fx.GraphModule
    geometry: Geometry
    fake_inputs: FakeInputs
    export_seconds: float
    signature: Signature


@dataclass
class Program:
    gm: fx.GraphModule
    geometry: Geometry
    n_visual: int
    fake_inputs: FakeInputs
    schedule: list[int]  # visual tokens in the attention of each decoder layer
    mlp_schedule: list[int]  # visual tokens in the MLP of each decoder layer
    rewrites: list[Rewrite] = field(default_factory=list)
    applied: list[str] = field(default_factory=list)
    visual_origin: str = ""  # the visual-mask node before any rewrite
    signature: Signature | None = None
    branches: Branches | None = None  # dynamic control flow between layers (compiler.branches)
    # Head slicing (compiler.heads): per layer the query and k/v heads its attention runs (0: attention removed),
    # and for sliced layers the ORIGINAL indices of the query heads kept.
    q_heads: list[int] = field(default_factory=list)
    kv_heads: list[int] = field(default_factory=list)
    kept_heads: dict[int, tuple[int, ...]] = field(default_factory=dict)
    # Removed attentions a linear adapter stands in for: layer -> (weight [D, D], bias [D]) as fitted.
    adapted: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # Set inside series_of_rewrites(): shape metadata refreshed incrementally, not after every rewrite.
    meta: IncrementalMeta | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_captured(cls, cap: Captured, n_visual: int) -> "Program":
        # Shape hints must hold the program's visual tokens plus text, or topk's k would be negative.
        fake = cap.fake_inputs.with_min_seq(n_visual + cap.fake_inputs.examples[0].shape[1])
        gm = _copy_graph_module(cap.gm)
        return cls(gm=gm, geometry=cap.geometry, n_visual=n_visual,
                   fake_inputs=fake, schedule=[n_visual] * cap.geometry.num_layers,
                   mlp_schedule=[n_visual] * cap.geometry.num_layers, visual_origin=output_values(gm)[2].name,
                   signature=cap.signature, q_heads=[cap.geometry.num_heads] * cap.geometry.num_layers,
                   kv_heads=[cap.geometry.num_kv_heads] * cap.geometry.num_layers)

    def clone(self) -> "Program":
        """An independent copy of the graph and bookkeeping (parameters shared)."""
        return Program(gm=_copy_graph_module(self.gm), geometry=self.geometry, n_visual=self.n_visual,
                       fake_inputs=self.fake_inputs, schedule=list(self.schedule),
                       mlp_schedule=list(self.mlp_schedule), rewrites=list(self.rewrites),
                       applied=list(self.applied), visual_origin=self.visual_origin, signature=self.signature,
                       q_heads=list(self.q_heads), kv_heads=list(self.kv_heads), kept_heads=dict(self.kept_heads),
                       adapted=dict(self.adapted))

    @contextmanager
    def series_of_rewrites(self):
        """Several token selections at increasing cuts: each refreshes shape metadata only up to its cut, and at
        the end the nodes still stale are propagated in the same ShapeEnv (about one propagation of the graph in
        all; test_rewrite_primitives checks the graph and metadata equal a full refresh after every cut)."""
        if self.meta is not None:  # nested: the outer series refreshes at its end
            yield self
            return
        self.meta = meta = IncrementalMeta(self.gm, self.fake_inputs)
        try:
            yield self
        finally:
            self.meta = None
            meta.refresh()

    def visual_name_at(self, layer: int) -> str:
        """Name of the visual-mask value live at the end of `layer`."""
        name = self.visual_origin
        for r in self.rewrites:
            if r.cut.layer <= layer:
                name = r.visual
        return name

    def residual_name(self, layer: int) -> str:
        """Name of the node holding the residual stream after `layer` (its last residual add)."""
        adds = [n for n in self.gm.graph.nodes if n.meta.get("vt_layer") == layer
                and n.meta.get("vt_role") == "residual" and n.target is aten.add.Tensor]
        return adds[-1].name

    # Output layout of the decoder stage: (logits, positions, visual_mask, then per layer its cache)
    @property
    def positions_node(self) -> fx.Node:
        return output_values(self.gm)[1]

    @property
    def visual_mask_node(self) -> fx.Node:
        return output_values(self.gm)[2]

    def token_count(self):
        """Symbolic token count at the end of the graph (S minus every token removed)."""
        return self.positions_node.meta["val"].shape[1]

    @property
    def last_cut(self) -> Cut:
        return self.rewrites[-1].cut if self.rewrites else Cut(0)

    def visual_at(self, cut: "Cut | int") -> int:
        """Visual tokens present at a cut (entering its layer's attention, or its MLP after the attention)."""
        cut = Cut.at(cut)
        layer = min(cut.layer, len(self.schedule) - 1)
        return self.mlp_schedule[layer] if cut.after_attention else self.schedule[layer]

    def __call__(self, *args) -> dict:
        """Run the graph eagerly: {output name: value} (compiler.signature)."""
        return self.signature.unpack(self.gm(*args))


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with its own graph, sharing parameters with `gm` (no weight copies)."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(out[0] if isinstance(out, tuple) else out)
    graph._codegen = gm.graph._codegen  # pytree in/out specs: the calling convention is unchanged
    new = fx.GraphModule(gm, graph)
    for n_old, n_new in zip(gm.graph.nodes, new.graph.nodes):
        n_new.meta = dict(n_old.meta)
    return new


_DIRECT: dict = {}


def with_direct_calls(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` (sharing its parameters) whose ATen operator calls skip OpOverload.__call__, a Python frame
    that only forwards to the operator's C++ entry point (OpOverload._op): the same operators, arguments and
    dispatch, ~12% less time per decode step of the testbed on one thread, where per-call overhead is most of it.
    Conversions to the dtype a tensor already has are dropped (aten.to returns the tensor itself there)."""
    new = _copy_graph_module(gm)
    for node in list(new.graph.nodes):
        if _is_same_dtype_conversion(node):  # aten.to returns its input itself then: the same alias, one call less
            node.replace_all_uses_with(node.args[0])
            new.graph.erase_node(node)
    for node in new.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            fn = _DIRECT.get(node.target)
            if fn is None:
                fn = _DIRECT[node.target] = functools.partial(node.target._op)
                fn.__name__ = str(node.target).replace(".", "_")  # the name FX's generated code gives it
            node.target = fn
    new.recompile()
    return new


def _is_same_dtype_conversion(node: fx.Node) -> bool:
    if node.target is not torch.ops.aten.to.dtype or len(node.args) != 2 or node.kwargs:
        return False
    src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    return isinstance(src, torch.Tensor) and src.dtype == node.args[1]


def dynamic_batch_and_seq(n_inputs: int, min_seq: int, max_seq: int, max_batch: int = 4096) -> tuple:
    """torch.export dynamic_shapes for decoder-stage inputs: batch (dim 0) and sequence (dim 1) symbolic.

    Dim.DYNAMIC hints, not named Dims: a named Dim turns every shape guard that sympy cannot prove over
    its whole range into a ConstraintViolationError, and some kernels' fake implementations emit such
    guards although they hold for every length (on CUDA, e.g. min(16*seq, 32*seq) == 16*seq from stride
    checks, or the mask padded to a multiple of 8). A hint still fails if the axis gets specialised to
    one value; the inputs' shared batch and sequence symbols are unified by the graph itself.
    """
    batch = torch.export.Dim.DYNAMIC(min=1, max=max_batch)
    seq = torch.export.Dim.DYNAMIC(min=min_seq, max=max_seq)
    return tuple({0: batch, 1: seq} for _ in range(n_inputs))


def capture_decoder(stage: nn.Module, geometry: Geometry, device, dtype,
                    max_seq: int = 32768) -> Captured:
    """torch.export the decoder stage with symbolic batch and sequence length."""
    import time

    n_vis = geometry.visual_tokens_per_image
    # Example sizes chosen to differ from every static dim, so duck-sized symbols stay distinct.
    batch, seq = 3, n_vis + 11
    while seq in (geometry.hidden_size, geometry.head_dim, geometry.vocab_size, geometry.num_heads):
        seq += 1
    emb = torch.zeros(batch, seq, geometry.hidden_size, device=device, dtype=dtype)
    mask = torch.ones(batch, seq, dtype=torch.long, device=device)
    pos = torch.arange(seq, device=device).unsqueeze(0).expand(batch, seq)
    if geometry.position_axes > 1:  # M-RoPE: [B, S, axes], token axis 1 as in every other input
        pos = pos.unsqueeze(-1).expand(batch, seq, geometry.position_axes)
    pos = pos.contiguous()
    vis = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    examples = [emb, mask, pos, vis]
    dyn = dynamic_batch_and_seq(len(examples), min_seq=2, max_seq=max_seq)
    t0 = time.perf_counter()
    with torch.no_grad(), uncached_fake_dispatch():
        ep = torch.export.export(stage, tuple(examples), dynamic_shapes=dyn)
    gm = ep.module()
    seconds = time.perf_counter() - t0
    _strip_input_guards(gm)
    annotate(gm, geometry.num_layers)
    signature = add_cache_outputs(gm, geometry.num_layers)
    fake = FakeInputs(examples, [(0, 1)] * len(examples))
    refresh_meta(gm, fake)
    return Captured(gm=gm, geometry=geometry, fake_inputs=fake, export_seconds=seconds, signature=signature)


# Ops between a layer's RoPE'd keys (or its values) and the SDPA call: GQA's repeat_kv (unsqueeze, slice,
# expand, reshape), the head repeats a head slicing emits instead (compiler.heads: repeat_interleave, index_select)
# and layout no-ops. The cache holds the value before them.
_VIEW_LIKE = {aten.reshape.default, aten.view.default, aten._unsafe_view.default, aten.expand.default,
              aten.slice.Tensor, aten.unsqueeze.default, aten.clone.default, aten.alias.default,
              aten.repeat_interleave.self_int, aten.index_select.default}


def cache_source(node: fx.Node) -> fx.Node:
    """The [B, H_kv, S, hd] value an SDPA key/value argument is made from (before any GQA repeat)."""
    best, cur = node, node
    while cur.op == "call_function" and cur.target in _VIEW_LIKE:
        cur = cur.args[0]
        val = cur.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dim() < 4:
            break
        if val.dim() == 4:
            best = cur
    return best


def add_cache_outputs(gm: fx.GraphModule, num_layers: int) -> Signature:
    """Extend the captured graph's outputs (logits, positions, visual) with each layer's cache: the positions of
    the keys its attention sees, its keys and its values (compiler.signature). Returns the signature."""
    logits, positions, visual = output_values(gm)[:3]
    values, slots, layers = [logits, positions, visual], [END] * 3, []
    for layer in range(num_layers):
        found = layer_nodes(gm, layer, "sdpa")
        if not found:
            continue
        sdpa = found[0]
        values += [positions, cache_source(sdpa.args[1]), cache_source(sdpa.args[2])]
        slots += [layer] * 3
        layers.append(layer)
    set_outputs(gm, values, slots)
    gm.graph._codegen = fx.graph.CodeGen()  # flat positional inputs and a flat output tuple
    gm.recompile()
    return prefill_signature(layers)


def _strip_input_guards(gm: fx.GraphModule) -> None:
    """Drop export's input-shape guard call; the runtime validates inputs itself."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and "guard" in str(n.target):
            gm.graph.erase_node(n)
    gm.recompile()
