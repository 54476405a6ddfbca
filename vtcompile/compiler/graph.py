"""FX graph analyses shared by every rewrite: layer/role annotation, live-ins, the token axis, cleanup.

Annotations come from node.meta["nn_module_stack"] (never from node names). Every node gets
``meta["vt_layer"]``: -1 for the preamble (masks, rotary tables, inputs), 0..L-1 for decoder layer i,
and L for the postamble (final norm, LM head, outputs); ``meta["vt_pos"]``: the same with +0.5 for the MLP
half of a layer (from its post-attention norm on), so rewrites can cut a layer after its attention; and
``meta["vt_role"]``.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from ..errors import UnsupportedModelError

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
SDPA = torch.ops.aten.scaled_dot_product_attention.default

_ROLE_SUFFIX = {
    "q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj", "o_proj": "o_proj",
    "input_layernorm": "norm", "post_attention_layernorm": "norm",
}


def _innermost(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    return list(stack.values())[-1][0]


def _role(node: fx.Node, path: str | None) -> str:
    if node.op == "call_function" and node.target is SDPA:
        return "sdpa"
    if path is None:
        return "other"
    parts = path.split(".")
    for part in reversed(parts):
        if part in _ROLE_SUFFIX:
            return _ROLE_SUFFIX[part]
    if "mlp" in parts:
        return "mlp"
    if "self_attn" in parts:
        return "attn"
    if _LAYER_RE.search(path) and _LAYER_RE.search(path).end() == len(path):
        return "residual"
    return "other"


def annotate(gm: fx.GraphModule, num_layers: int) -> None:
    """Set vt_layer / vt_role on every node of a freshly captured decoder graph."""
    nodes = list(gm.graph.nodes)
    layer_of = []
    for n in nodes:
        path = _innermost(n)
        m = _LAYER_RE.search(path) if path else None
        layer_of.append(int(m.group(1)) if m else None)
    annotated = [i for i, layer in enumerate(layer_of) if layer is not None]
    if not annotated:
        raise UnsupportedModelError(
            "no decoder-layer nodes found in the captured graph (nn_module_stack has no 'layers.<i>' entries); "
            "the model's decoder layout is not supported"
        )
    first, last = annotated[0], annotated[-1]
    current, mlp_half = -1, False
    for i, n in enumerate(nodes):
        if layer_of[i] is not None:
            if layer_of[i] != current:
                current, mlp_half = layer_of[i], False
            path = _innermost(n) or ""
            mlp_half = mlp_half or "post_attention_layernorm" in path or ".mlp" in path
            layer = current
        elif i < first or n.op in ("placeholder", "get_attr"):
            layer = -1
        elif i > last:
            layer = num_layers
        else:
            layer = current
        n.meta["vt_layer"] = layer
        n.meta["vt_pos"] = layer + 0.5 if (0 <= layer < num_layers and layer == current and mlp_half) else layer
        n.meta["vt_role"] = _role(n, _innermost(n))
    found = sorted({n.meta["vt_layer"] for n in nodes if 0 <= n.meta["vt_layer"] < num_layers})
    if found != list(range(num_layers)):
        raise UnsupportedModelError(f"expected decoder layers 0..{num_layers - 1} in the graph, found {found}")


def layer_nodes(gm: fx.GraphModule, layer: int, role: str | None = None) -> list[fx.Node]:
    return [n for n in gm.graph.nodes
            if n.meta.get("vt_layer") == layer and (role is None or n.meta.get("vt_role") == role)]


def sdpa_node(gm: fx.GraphModule, layer: int) -> fx.Node:
    found = layer_nodes(gm, layer, "sdpa")
    if not found and not layer_nodes(gm, layer, "o_proj"):
        raise UnsupportedModelError(
            f"layer {layer} has no attention: an earlier pass removed it; list the pass that reads "
            f"layer {layer}'s attention before the one that removes it")
    if len(found) != 1:
        raise UnsupportedModelError(
            f"layer {layer} has {len(found)} scaled_dot_product_attention nodes, expected 1; the model must "
            "use SDPA attention (transformers attn_implementation='sdpa')"
        )
    return found[0]


def output_node(gm: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(gm.graph.nodes) if n.op == "output")


def set_outputs(gm: fx.GraphModule, values: list[fx.Node], slots: list[float]) -> None:
    """Make the graph return the flat tuple `values`; slots[i] is the cut position output i is read at
    (compiler.signature.Output.layer): a rewrite at cut b redirects only the outputs read at or after b."""
    out = output_node(gm)
    out.args = (tuple(values),)
    out.meta["vt_slots"] = list(slots)


def _use_pos(user: fx.Node, node: fx.Node) -> float:
    """Where `user` reads `node`: its own position, or for the output node the latest slot holding `node`."""
    if user.op == "output":
        slots = user.meta.get("vt_slots")
        if slots is None:
            return user.meta["vt_pos"]
        return max(s for v, s in zip(output_values_of(user), slots) if v is node)
    return user.meta["vt_pos"]


def live_ins(gm: fx.GraphModule, position: float) -> list[fx.Node]:
    """Values produced before `position` (a cut's, compiler.cut) and used at or after it."""
    out = []
    for n in gm.graph.nodes:
        if n.meta["vt_pos"] < position and any(_use_pos(u, n) >= position for u in n.users):
            out.append(n)
    return out


def redirect_uses(old: fx.Node, new: fx.Node, position: float) -> None:
    """Uses of `old` at or after `position` read `new` instead (output slots by their own position)."""
    old.replace_all_uses_with(new, delete_user_cb=lambda u: u.op != "output" and u.meta.get("vt_pos", -1) >= position)
    out = next((u for u in old.users if u.op == "output"), None)
    if out is None:
        return
    slots = out.meta.get("vt_slots")
    values = output_values_of(out)
    if slots is None:
        slots = [out.meta["vt_pos"]] * len(values)
    out.args = (tuple(new if v is old and s >= position else v for v, s in zip(values, slots)),)


def _expr(x):
    return x.node.expr if isinstance(x, torch.SymInt) else x


def same_size(a, b) -> bool:
    """Structural equality of two (possibly symbolic) sizes, without adding shape guards."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, int) or isinstance(b, int):
        return False
    return bool((_expr(a) - _expr(b)).expand() == 0)


def token_axes(node: fx.Node, n_tokens) -> list[int]:
    """Dimensions of a node's value whose size is the current token count."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return []
    return [d for d, size in enumerate(val.shape) if same_size(size, n_tokens)]


def output_values_of(out: fx.Node) -> list[fx.Node]:
    vals = out.args[0]
    return list(vals) if isinstance(vals, (tuple, list)) else [vals]


def output_values(gm: fx.GraphModule) -> list[fx.Node]:
    return output_values_of(output_node(gm))


class FakeInputs:
    """Example input shapes to re-propagate symbolic shape metadata after a rewrite.

    Batch and sequence dims are made dynamic with a fresh ShapeEnv each time, so every node's
    meta["val"] reflects the graph as it is now (stale metadata is the classic token-pruning bug).
    """

    def __init__(self, examples: list[torch.Tensor], dynamic_dims: list[tuple[int, ...]]):
        self.examples = examples
        self.dynamic_dims = dynamic_dims

    def with_min_seq(self, seq: int) -> "FakeInputs":
        """The same inputs with the sequence dim (dim 1) at least `seq` long (hints must fit the program)."""
        if self.examples[0].shape[1] >= seq:
            return self
        grown = [t.new_zeros((t.shape[0], seq, *t.shape[2:])) for t in self.examples]
        return FakeInputs(grown, self.dynamic_dims)

    def make(self, mode) -> list[torch.Tensor]:
        fakes = []
        for t, dyn in zip(self.examples, self.dynamic_dims):
            ctx = StatelessSymbolicContext(
                dynamic_sizes=[DimDynamic.DUCK if d in dyn else DimDynamic.STATIC for d in range(t.dim())])
            fakes.append(mode.from_tensor(t, symbolic_context=ctx))
        return fakes

    def check_symbolic(self, fakes: list[torch.Tensor]) -> None:
        """Raise if a dynamic dim came out of propagation as a constant (a guard specialised it)."""
        for i, (f, dyn) in enumerate(zip(fakes, self.dynamic_dims)):
            static = [d for d in dyn if not isinstance(f.shape[d], torch.SymInt) or f.shape[d].node.expr.is_number]
            if static:
                raise RuntimeError(
                    f"shape propagation specialised dims {static} of decoder input {i} to {tuple(f.shape)} "
                    f"(torch {torch.__version__}); node metadata would no longer follow the token count")


def uncached_fake_dispatch():
    """torch.export without fake-tensor dispatch caching, which costs more than it saves on these graphs: each node
    is traced once, and a cache entry with symbolic sizes is rebuilt from scratch (as_strided/set_ on new SymInts)
    on every hit. Measured on the 2-core EPYC: shape propagation of a program about half the time (tiny-gqa, a
    program of three cuts: 6.1 -> 3.6 s); exporting such a program and its decode step, runs alternating in one
    process, 9.57 / 7.14 s cached against 5.95 / 4.75 s without. A torch config patch for the duration of the export
    only."""
    return torch._dynamo.config.patch(fake_tensor_cache_enabled=False)


def _propagation_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    mode.cache_enabled = False  # see uncached_fake_dispatch
    return mode


def _symbolic_dispatch():
    # The Python dispatcher routes composite ops (aten.linear, ...) through their symbolic-aware Python
    # decompositions, as torch.export does; without it torch 2.11's C++ linear reads concrete sizes and
    # specialises batch and sequence to the example's values.
    from torch._dispatch.python import enable_python_dispatcher

    return enable_python_dispatcher()


def refresh_meta(gm: fx.GraphModule, inputs: FakeInputs) -> None:
    """Fresh node.meta["val"] for the whole graph, in a new ShapeEnv."""
    mode = _propagation_mode()
    fakes = inputs.make(mode)
    with _symbolic_dispatch():
        FakeTensorProp(gm, mode=mode).propagate_dont_convert_inputs(*fakes)
    inputs.check_symbolic(fakes)


class IncrementalMeta:
    """Shape metadata kept fresh across a series of rewrites at increasing cuts, in one ShapeEnv.

    A token selection at a cut changes only nodes at positions >= its emit_position (what it emits, and the later
    users it redirects), so values before that stay valid. `refresh(upto)` propagates just the stale
    nodes before `upto` (all a selection at `upto` reads); a pass with a cut in every layer then costs
    about one propagation of the graph instead of one per cut (on the 32-layer 7B decoder that is
    minutes). `refresh()` with no bound brings the whole graph up to date.
    """

    def __init__(self, gm: fx.GraphModule, inputs: FakeInputs):
        self.gm, self.inputs = gm, inputs
        self.mode = _propagation_mode()
        self.fakes = inputs.make(self.mode)
        self.fresh: set[fx.Node] = set()

    def invalidate_from(self, pos: float) -> None:
        self.fresh = {n for n in self.fresh if n.meta.get("vt_pos", -1) < pos}

    def refresh(self, upto: float | None = None) -> None:
        nodes = [n for n in self.gm.graph.nodes if upto is None or n.op != "output"]
        wanted = [i for i, n in enumerate(nodes)
                  if upto is None or (n.op != "get_attr" and n.meta.get("vt_pos", -1) < upto)]
        interp = FakeTensorProp(self.gm, mode=self.mode)
        inputs = iter(self.fakes)
        with self.mode, _symbolic_dispatch():
            for n in nodes[:wanted[-1] + 1] if wanted else []:
                if n.op == "placeholder":
                    interp.env[n] = n.meta["val"] = next(inputs)
                elif n in self.fresh and n.op not in ("get_attr", "output"):
                    interp.env[n] = n.meta["val"]
                else:
                    interp.env[n] = interp.run_node(n)
                    self.fresh.add(n)
        self.inputs.check_symbolic(self.fakes)


def tidy(gm: fx.GraphModule) -> None:
    """Dead-code elimination, lint, recompile (what every rewrite ends with)."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def cleanup(gm: fx.GraphModule, inputs: FakeInputs) -> None:
    """After every rewrite: dead-code elimination, lint, recompile, fresh shape metadata."""
    tidy(gm)
    refresh_meta(gm, inputs)


def count_ops(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def symbolic_dims(gm: fx.GraphModule) -> list[tuple[int, ...]]:
    """Per placeholder: the dims whose size is symbolic in its shape metadata (batch, token axes, cache lengths)."""
    dims = []
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            val = n.meta.get("val")
            shape = val.shape if isinstance(val, torch.Tensor) else ()
            dims.append(tuple(d for d, s in enumerate(shape) if not isinstance(s, int)))
    return dims
