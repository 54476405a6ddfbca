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
from .graph import uncached_fake_dispatch
from .staged import Stage


def export_stage(stage: Stage, args: tuple) -> torch.export.ExportedProgram:
    """torch.export one stage on real example inputs, its dynamic dims symbolic."""
    shapes = tuple({d: Dim.DYNAMIC for d in dims} for dims in stage.dynamic)
    try:
        with torch.no_grad(), uncached_fake_dispatch():
            return torch.export.export(stage.module, tuple(args), dynamic_shapes=shapes)
    except Exception as exc:  # noqa: BLE001 - re-raised with the stage that failed
        raise UnsupportedModelError(f"exporting stage {stage.name} with symbolic batch and lengths failed: "
                                    f"{type(exc).__name__}: {exc}") from exc


def strip_guards(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """What ExportedProgram.module() wraps around the graph for a Python caller, taken off: the input-shape guard
    call, the forward hooks that check the inputs (the runtime checks them) and the pytree flatten/unflatten of
    inputs and outputs (every stage takes and returns flat tensors). Each ran in Python on every call, outside the
    compiled code (cProfile of a compiled testbed decode loop)."""
    for n in list(gm.graph.nodes):
        if n.op == "call_module" and "guard" in str(n.target):
            gm.graph.erase_node(n)
    # the hooks: the input checks, and the switch for graph inputs that are nn.Modules (a stage has none)
    gm._forward_pre_hooks.clear()
    gm._forward_hooks.clear()
    gm._forward_hooks_always_called.clear()
    gm.graph._codegen = torch.fx.graph.CodeGen()  # positional tensors in, the output tuple out
    gm.recompile()
    return gm
