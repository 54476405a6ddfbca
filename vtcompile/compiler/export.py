"""The one export policy: a stage is torch.export'ed with the dims its shape metadata holds symbolic kept symbolic.

Every target but eager starts from this export (Inductor compiles it, ONNX translates it, artifacts store it),
so loading an artifact runs exactly the graph that was tested. Dim.DYNAMIC hints, not named Dims: a named Dim
turns every guard sympy cannot prove over its whole range into an error, while these only fail when an axis is
specialised to one value (a real bug: the stage would no longer serve every prompt length).
"""
from __future__ import annotations

import torch
from torch.export import Dim

from ..errors import UnsupportedModelError
from .staged import Stage


def export_stage(stage: Stage, args: tuple) -> torch.export.ExportedProgram:
    """torch.export one stage on real example inputs, its dynamic dims symbolic."""
    shapes = tuple({d: Dim.DYNAMIC for d in dims} for dims in stage.dynamic)
    try:
        with torch.no_grad():
            return torch.export.export(stage.module, tuple(args), dynamic_shapes=shapes)
    except Exception as exc:  # noqa: BLE001 - re-raised with the stage that failed
        raise UnsupportedModelError(f"exporting stage {stage.name} with symbolic batch and lengths failed: "
                                    f"{type(exc).__name__}: {exc}") from exc


def strip_guards(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Drop the input-shape guard call that ExportedProgram.module() inserts (the runtime checks inputs)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and "guard" in str(n.target):
            gm.graph.erase_node(n)
    gm.recompile()
    return gm
