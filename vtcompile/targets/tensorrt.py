"""The tensorrt target: torch-tensorrt dynamo compile of each decoder stage (CUDA only).

TensorRT needs two things the generic rewrite does not give it (compiler/rewrite.py: topk with
k = S - removed over every position, then sort and per-row gather):
  * a build-time constant k for TopK: the keep indices are recomputed with topk over the visual tokens
    only (k = k_visual, static) and an order-preserving compaction (cumsum + scatter into a permutation)
    instead of sort;
  * plain index_select rather than element-wise gather: every per-row gather along the token axis of the
    residual stream, RoPE tables and bookkeeping becomes index_select on the batch-flattened tensor with row
    offsets (the 4-D mask keeps its element-wise gathers; see _gathers_to_index_select).
`trt_friendly(program)` does both on a copy of the graph; it runs on CPU, so its numerics are tested in the
default suite. The compile itself (`lower`), saving as an exported program (`save`) and loading
(`load`) need CUDA and torch_tensorrt, are imported lazily and are UNTESTED in this repository's CI
(no GPU); tests/gpu holds their tests, skipped without CUDA.
"""
from __future__ import annotations

import importlib.util
import logging
import operator
import time
from pathlib import Path

import torch
import torch.fx as fx

from ..errors import TargetUnavailableError, UnsupportedModelError

aten = torch.ops.aten
log = logging.getLogger(__name__)

REQUIREMENT = "a CUDA GPU and the torch-tensorrt package (pip install 'vtcompile[tensorrt]')"
NEEDS_EXPORT = True
FORMAT = "pt2"
DECODES = False
DECODE_NOTE = "the decode step is not lowered to TensorRT yet (its in-place cache writes are untested there)"
# TensorRT optimisation profile: engines are built for batch 1..MAX_BATCH and sequence min_seq..MAX_SEQ
# (LLaVA-1.5's 4096 positions); the opt shape is one prompt of the captured example length.
MAX_BATCH = 8
MAX_SEQ = 4096


def is_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("torch_tensorrt") is not None


def _require():
    if not torch.cuda.is_available():
        raise TargetUnavailableError("target 'tensorrt' needs a CUDA GPU and none is visible "
                                     "(torch.cuda.is_available() is False); use --target inductor or onnx here")
    try:
        import torch_tensorrt
    except ImportError as exc:
        raise TargetUnavailableError(f"target 'tensorrt' needs the torch-tensorrt package ({exc}); install it "
                                     "with pip install 'vtcompile[tensorrt]' (matching your torch version)") from None
    return torch_tensorrt


# -- graph transform (CPU-testable) -------------------------------------------------------------------
class _Emit:
    def __init__(self, graph: fx.Graph):
        self.graph = graph

    def __call__(self, target, *args, **kwargs) -> fx.Node:
        return self.graph.call_function(target, args, kwargs)


def _copy(gm: fx.GraphModule) -> fx.GraphModule:
    from ..compiler.program import _copy_graph_module

    return _copy_graph_module(gm)


def _row_take(e: _Emit, x: fx.Node, idx: fx.Node, rest: list) -> fx.Node:
    """x[b, idx[b, j], ...] (x: [B, S, *rest], idx: [B, K]) as one index_select on x viewed as [B*S, ...].

    `rest` holds x's sizes after dim 1 (ints or sym-size nodes); they are spelled out because a -1 in the
    reshape makes export emit a guard (min(n, S*n) == n) that it cannot prove."""
    batch = e(aten.sym_size.int, idx, 0)
    count = e(aten.sym_size.int, x, 1)
    kept = e(aten.sym_size.int, idx, 1)
    inner = []
    for r in rest:
        inner = [r] if not inner else [inner[0] * r if isinstance(inner[0], int) and isinstance(r, int)
                                       else e(operator.mul, inner[0], r)]
    flat = e(aten.reshape.default, x, [e(operator.mul, batch, count)] + inner)
    ones = e(aten.ones_like.default, e(aten.select.int, idx, 1, 0))  # [B] of 1 (no device constant)
    row_start = e(aten.mul.Tensor, e(aten.sub.Tensor, e(aten.cumsum.default, ones, 0), 1), count)
    offsets = e(aten.add.Tensor, idx, e(aten.unsqueeze.default, row_start, 1))
    picked = e(aten.index_select.default, flat, 0, e(aten.reshape.default, offsets, [-1]))
    return e(aten.reshape.default, picked, [batch, kept] + rest)


def _keep_source(index: fx.Node) -> fx.Node | None:
    """The [B, K] keep-index node behind a gather index built as expand(view(keep))."""
    if index.op == "call_function" and index.target is aten.expand.default:
        view = index.args[0]
        if view.op == "call_function" and view.target is aten.view.default:
            return view.args[0]
    return None


def _gathers_to_index_select(gm: fx.GraphModule) -> int:
    """Per-row gathers along the token axis 1 (residual stream, RoPE cos/sin, bookkeeping) -> index_select.

    The 4-D attention mask is gathered on axes 2 and 3; flattening it trips export's shape guards, so those
    stay element-wise gathers (TensorRT's IGatherLayer in element mode)."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.gather.default:
            continue
        x, axis, index = node.args[:3]
        keep = _keep_source(index)
        if keep is None or "val" not in node.meta or axis % node.meta["val"].dim() != 1:
            continue
        shape = node.meta["val"].shape  # x's shape but on axis 1 (x may be a replaced node, without metadata)
        with gm.graph.inserting_before(node):
            e = _Emit(gm.graph)
            rest = [shape[d] if isinstance(shape[d], int) else e(aten.sym_size.int, x, d) for d in range(2, len(shape))]
            new = _row_take(e, x, keep, rest)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        n += 1
    return n


def _cumsum_rank(e: _Emit, mask_i: fx.Node) -> fx.Node:
    return e(aten.sub.Tensor, e(aten.cumsum.default, mask_i, 1), 1)


def _compact(e: _Emit, first: fx.Node, n_first, pos: fx.Node) -> fx.Node:
    """Positions where `first` is True, in order, followed by the others: a per-row permutation [B, S]."""
    first_i = e(aten._to_copy.default, first, dtype=torch.int64)
    rest_i = e(aten.rsub.Scalar, first_i, 1)
    slot = e(aten.where.self, first, _cumsum_rank(e, first_i), e(aten.add.Tensor, _cumsum_rank(e, rest_i), n_first))
    return e(aten.scatter.src, e(aten.zeros_like.default, first_i), 1, slot, pos)


def _static_k_selection(gm: fx.GraphModule, rewrites: list) -> int:
    """Replace every topk(k = S - c) + sort by topk over the visual tokens (k = k_visual) + compaction."""
    topks = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is aten.topk.default
             and isinstance(n.args[1], fx.Node) and n.args[1].target is operator.sub]
    if len(topks) != len(rewrites):
        raise UnsupportedModelError(f"expected {len(rewrites)} token-selection topk nodes (one per rewrite), found "
                                    f"{len(topks)}; the graph was not produced by compiler.rewrite.select_tokens")
    for top, rw in zip(topks, rewrites):
        forced, k_node = top.args[0], top.args[1]
        removed = k_node.args[1]
        if forced.target is not aten.where.ScalarOther or removed != rw.before - rw.after:
            raise UnsupportedModelError(f"token selection {rw.cut} does not have the select_tokens form")
        vis, score = forced.args[0], forced.args[1]
        idx_users = [u for u in top.users if u.target is operator.getitem and u.args[1] == 1]
        sort = next(u for u in idx_users[0].users if u.target is aten.sort.default)
        keep = next(u for u in sort.users if u.target is operator.getitem and u.args[1] == 0)
        with gm.graph.inserting_before(keep.next):
            e = _Emit(gm.graph)
            vis_i = e(aten._to_copy.default, vis, dtype=torch.int64)
            pos = _cumsum_rank(e, e(aten.ones_like.default, vis_i))  # 0..S-1 per row
            keep_mask = e(aten.logical_not.default, vis)
            if rw.after > 0:
                vis_idx = e(aten.slice.Tensor, _compact(e, vis, rw.before, pos), 1, 0, rw.before)  # [B, n_vis]
                vis_score = _row_take(e, score, vis_idx, [])
                best = e(operator.getitem, e(aten.topk.default, vis_score, rw.after, 1), 1)  # static k
                chosen = _row_take(e, vis_idx, best, [])
                keep_mask = e(aten.scatter.value, keep_mask, 1, chosen, True)
            new_keep = e(aten.slice.Tensor, _compact(e, keep_mask, k_node, pos), 1, 0, k_node)
        keep.replace_all_uses_with(new_keep)
    gm.graph.eliminate_dead_code()
    return len(topks)


def trt_friendly(program) -> fx.GraphModule:
    """A copy of the program's graph with static-k selection and index_select gathers (same numerics)."""
    gm = _copy(program.gm)
    _gathers_to_index_select(gm)  # first: it reads the shape metadata of the original nodes
    _static_k_selection(gm, program.rewrites)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm


def prepare(program):
    """The compiler transform TensorRT needs, run before staging: a copy of the program whose graph has static-k
    selection and index_select gathers (same numerics)."""
    if program.branches is not None:
        _require()
        raise TargetUnavailableError(
            f"target 'tensorrt' does not lower programs with branches (here: pass {program.branches.by!r}'s "
            f"{program.branches.label}) yet: its static-k selection transform (trt_friendly) works on whole decoder "
            "graphs, not on per-layer stages. Use target inductor or onnx for them, or a static form of the pass")
    out = program.clone()
    out.gm = trt_friendly(program)
    return out


# -- compile / save / load (CUDA + torch_tensorrt; untested here) ---------------------------------------
def _inputs(torch_tensorrt, stage, exported):
    """Optimisation profile: batch 1..MAX_BATCH and each symbolic length from the export's lower bound (at
    least 1) to MAX_SEQ; the example's shapes are the opt shapes."""
    (args, _kwargs) = exported.example_inputs
    specs = []
    for t, name, dims in zip(args, stage.inputs, stage.dynamic):
        lo, opt, hi = list(t.shape), list(t.shape), list(t.shape)
        for d in dims:
            lo[d], hi[d] = 1, (MAX_BATCH if d == 0 else MAX_SEQ)
        specs.append(torch_tensorrt.Input(min_shape=tuple(lo), opt_shape=tuple(opt), max_shape=tuple(hi),
                                          dtype=t.dtype, name=name))
    return specs


class TensorRTStage:
    def __init__(self, module, label: str = "", compile_seconds: float = 0.0):
        self.module = module
        self.label = label
        self.compile_seconds = compile_seconds

    def __call__(self, *args):
        batch, seq = args[0].shape[:2]
        if batch > MAX_BATCH or seq > MAX_SEQ:
            raise UnsupportedModelError(f"the TensorRT engine was built for batch <= {MAX_BATCH} and sequence "
                                        f"<= {MAX_SEQ}; found {batch} x {seq}")
        with torch.no_grad():
            return tuple(self.module(*args))


def lower(stage, exported) -> TensorRTStage:
    torch_tensorrt = _require()
    t0 = time.perf_counter()
    dtype = exported.example_inputs[0][0].dtype
    # fp32 engines without TF32, so that they match eager to 1e-4 (TensorRT enables TF32 by default)
    settings = dict(enabled_precisions={dtype}, min_block_size=1, truncate_double=True, disable_tf32=True)
    try:
        module = torch_tensorrt.dynamo.compile(exported, arg_inputs=_inputs(torch_tensorrt, stage, exported),
                                               **settings)
    except TypeError:  # torch-tensorrt < 2.4 names them `inputs`
        module = torch_tensorrt.dynamo.compile(exported, inputs=_inputs(torch_tensorrt, stage, exported), **settings)
    seconds = time.perf_counter() - t0
    log.info("tensorrt: built %s in %.1f s", stage.name, seconds)
    lowered = TensorRTStage(module, label=stage.name, compile_seconds=seconds)
    lowered.example = exported.example_inputs[0]
    return lowered


def save(stage, exported, lowered, directory: Path) -> list[str]:
    torch_tensorrt = _require()
    name = f"{stage.name}.pt2"
    example = [t.cuda() for t in exported().example_inputs[0]]
    torch_tensorrt.save(lowered.module, str(directory / name), output_format="exported_program",
                        arg_inputs=example, retrace=True)
    return [name]


def load(stage, directory: Path, files: list[str]) -> TensorRTStage:
    _require()  # registers TensorRT's ops with torch before the program is deserialised
    ep = torch.export.load(str(directory / files[0]))
    return TensorRTStage(ep.module(), label=stage.name)
