"""Which keys a query may attend to: the attention rule of a decoder layer, in ORIGINAL sequence indices.

Sequence indices count every position of the padded prompt (left padding included), then the new tokens
(S, S + 1, ...), as transformers' masks count them (masking_utils: causal `kv_idx <= q_idx`, sliding window
`kv_idx > q_idx - window`). A pruned program gathers tokens but each keeps its original index, so one rule
serves the captured graph's own masks (built before any gather), the decode step (compiler.decode, which reads
each cache slot's key index) and the masked-key reference (compiler.reference): they cannot disagree about a
window. A layer's window comes from the model family (Geometry.windows); None is plain causal attention.
"""
from __future__ import annotations

import torch

aten = torch.ops.aten


def key_visible(query_index: torch.Tensor, key_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """Broadcast bool: the key at `key_index` is visible to the query at `query_index` (negative key indices are
    empty slots or padding and never visible)."""
    visible = (key_index >= 0) & (key_index <= query_index)
    if window is not None:
        visible = visible & (key_index > query_index - window)
    return visible


def emit_key_visible(emit, query_index, key_index, window: int | None):
    """key_visible as graph nodes (emit: compiler.rewrite.Emitter-like callable on aten ops)."""
    visible = emit(aten.logical_and.default, emit(aten.ge.Scalar, key_index, 0),
                   emit(aten.le.Tensor, key_index, query_index))
    if window is not None:
        visible = emit(aten.logical_and.default, visible,
                       emit(aten.gt.Tensor, key_index, emit(aten.sub.Tensor, query_index, window)))
    return visible
