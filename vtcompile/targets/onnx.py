"""The onnx target: torch.onnx.export (dynamo) of each decoder stage, run by ONNX Runtime.

The program re-exported with dynamic batch/sequence axes is translated to ONNX (topk's k stays a symbolic
S - removed, so one model serves every prompt length). Execution providers: TensorRT and CUDA when ONNX
Runtime offers them (onnxruntime-gpu), CPU otherwise; VTCOMPILE_ORT_PROVIDERS=CUDAExecutionProvider,...
overrides. Models over 2 GB keep their weights in a .onnx.data file next to the .onnx. ONNX Runtime's CPU
provider has no bfloat16 kernels, so bfloat16 models are refused with a message rather than failing inside.
Inputs and outputs cross as numpy arrays (no IO binding yet: on CUDA that is a host round trip).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

from ..errors import TargetUnavailableError, UnsupportedModelError

log = logging.getLogger(__name__)

REQUIREMENT = "the onnx, onnxscript and onnxruntime packages (pip install onnx onnxscript onnxruntime)"
NEEDS_EXPORT = True
FORMAT = "onnx"
DECODES = True
IN_PLACE_DECODE = False  # ONNX graphs do not mutate their inputs: the step returns the written caches
_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def is_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))


def providers() -> list[str]:
    """Execution providers to use, best first (VTCOMPILE_ORT_PROVIDERS overrides)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    wanted = os.environ.get("VTCOMPILE_ORT_PROVIDERS")
    if wanted:
        chosen = [p.strip() for p in wanted.split(",") if p.strip()]
        missing = [p for p in chosen if p not in available]
        if missing:
            raise TargetUnavailableError(f"VTCOMPILE_ORT_PROVIDERS names {', '.join(missing)}, which this ONNX "
                                         f"Runtime does not offer; available: {', '.join(available)}")
        return chosen
    return [p for p in _PREFERRED if p in available]


def _check_dtype(dtype: torch.dtype, chosen: list[str]) -> None:
    gpu = any(p != "CPUExecutionProvider" for p in chosen)
    if dtype == torch.bfloat16 or (dtype == torch.float16 and not gpu):
        raise TargetUnavailableError(
            f"target 'onnx' cannot run a {str(dtype).replace('torch.', '')} model with ONNX Runtime's providers "
            f"here ({', '.join(chosen)}): the CPU provider computes in float32 only. Load the model with "
            "--dtype float32 (or float16 with onnxruntime-gpu on CUDA).")


class OnnxStage:
    """An ONNX Runtime session over one stage; call it with the stage's inputs in order."""

    def __init__(self, path: Path, stage, files: list[str] | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        self.label = stage.name
        self.files = files or [self.path.name]
        self.providers = providers()
        opts = ort.SessionOptions()
        threads = os.environ.get("VTCOMPILE_ORT_THREADS")
        if threads:
            opts.intra_op_num_threads = int(threads)
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(self.path), opts, providers=self.providers)
        except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
            raise UnsupportedModelError(f"ONNX Runtime could not load {self.path.name} with {self.providers}: "
                                        f"{exc}") from exc
        self.compile_seconds = time.perf_counter() - t0
        self.input_names = list(stage.inputs)
        # The exporter drops inputs the graph never reads (a stage may take a value only for its size).
        taken = {i.name for i in self.session.get_inputs()}
        if not taken <= set(self.input_names):
            raise UnsupportedModelError(f"{self.path.name} takes inputs {sorted(taken)}, expected "
                                        f"{self.input_names}")
        self._fed = [name in taken for name in self.input_names]

    def __call__(self, *args):
        device = args[0].device
        feeds = {name: t.detach().cpu().numpy() for name, t, fed in zip(self.input_names, args, self._fed) if fed}
        outs = self.session.run(None, feeds)
        return tuple(torch.from_numpy(o).to(device) for o in outs)


def export_onnx(ep, path: Path, stage) -> list[str]:
    """Translate an exported stage to ONNX at `path`; returns the file names written (model, weights)."""
    try:
        onnx_program = torch.onnx.export(ep, dynamo=True, input_names=list(stage.inputs),
                                         output_names=_output_names(stage.outputs), optimize=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with what was exported
        raise UnsupportedModelError(f"torch.onnx.export of {stage.name} failed: {type(exc).__name__}: {exc}") from exc
    onnx_program.save(str(path))
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def _output_names(names: list[str]) -> list[str]:
    """ONNX output names: distinct from every value name inside the graph (the exporter names those after the
    export's nodes, which can coincide with the stage's node names) and from each other."""
    return [f"out{i}.{n}" for i, n in enumerate(names)]


def lower(stage, exported) -> OnnxStage:
    """Translate the exported stage to ONNX in a temporary directory (removed with the session) and open it."""
    _check_dtype(_dtype(exported), providers())
    log.info("onnx: exporting %s (%s) ...", stage.name, stage.role)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vtcompile-onnx-"))
    try:
        files = export_onnx(exported, tmp / f"{stage.name}.onnx", stage)
        lowered = OnnxStage(tmp / files[0], stage, files)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lowered.compile_seconds = time.perf_counter() - t0  # translation + session
    weakref.finalize(lowered, shutil.rmtree, str(tmp), True)
    log.info("onnx: exported %s and opened an ONNX Runtime session (%s) in %.1f s", stage.name,
             ", ".join(lowered.providers), lowered.compile_seconds)
    return lowered


def _dtype(ep) -> torch.dtype:
    """The floating dtype of an exported stage (its first floating parameter)."""
    for t in ep.state_dict.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def save(stage, exported, lowered, directory: Path) -> list[str]:
    if isinstance(lowered, OnnxStage):
        for name in lowered.files:
            shutil.copyfile(lowered.path.parent / name, directory / name)
        return list(lowered.files)
    return export_onnx(exported(), directory / f"{stage.name}.onnx", stage)


def load(stage, directory: Path, files: list[str]) -> OnnxStage:
    return OnnxStage(directory / files[0], stage, files)
