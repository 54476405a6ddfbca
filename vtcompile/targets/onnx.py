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
import os
import shutil
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch

from ..errors import TargetUnavailableError, UnsupportedModelError
from . import stage

REQUIREMENT = "the onnx, onnxscript and onnxruntime packages (pip install onnx onnxscript onnxruntime)"
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
    """An ONNX Runtime session over one decoder stage; call it like the program."""

    def __init__(self, path: Path, exported=None, label: str = ""):
        import onnxruntime as ort

        self.path = Path(path)
        self.exported = exported
        self.label = label
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
        self.session_seconds = time.perf_counter() - t0
        self.compile_seconds = self.session_seconds
        self.input_names = [i.name for i in self.session.get_inputs()]
        if len(self.input_names) != len(stage.INPUT_NAMES):
            raise UnsupportedModelError(f"{self.path.name} takes inputs {self.input_names}, expected "
                                        f"{list(stage.INPUT_NAMES)}")

    def __call__(self, *args):
        device = args[0].device
        feeds = {name: t.detach().cpu().numpy() for name, t in zip(self.input_names, args)}
        outs = self.session.run(None, feeds)
        return tuple(torch.from_numpy(o).to(device) for o in outs)


def export_onnx(ep, path: Path) -> list[str]:
    """Translate an exported program to ONNX at `path`; returns the file names written (model, weights)."""
    try:
        onnx_program = torch.onnx.export(ep, dynamo=True, input_names=list(stage.INPUT_NAMES),
                                         output_names=list(stage.OUTPUT_NAMES), optimize=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with what was exported
        raise UnsupportedModelError(f"torch.onnx.export of {path.stem} failed: {type(exc).__name__}: {exc}") from exc
    onnx_program.save(str(path))
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def lower(program) -> OnnxStage:
    chosen = providers()
    _check_dtype(program.fake_inputs.examples[0].dtype, chosen)
    t0 = time.perf_counter()
    ep = stage.export_program(program)
    tmp = Path(tempfile.mkdtemp(prefix="vtcompile-onnx-"))
    try:
        files = export_onnx(ep, tmp / f"{stage.stem(program)}.onnx")
        lowered = OnnxStage(tmp / files[0], exported=ep, label=stage.stem(program))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lowered.files = files
    lowered.compile_seconds = time.perf_counter() - t0  # export + translation + session
    weakref.finalize(lowered, shutil.rmtree, str(tmp), True)
    print(f"[vtcompile] onnx: exported {stage.stem(program)} and opened an ONNX Runtime session "
          f"({', '.join(lowered.providers)}) in {lowered.compile_seconds:.1f}s", file=sys.stderr, flush=True)
    return lowered


def save_stage(program, lowered: OnnxStage, directory: Path) -> dict:
    if isinstance(lowered, OnnxStage):
        files = list(lowered.files)
        for name in files:
            shutil.copyfile(lowered.path.parent / name, directory / name)
    else:
        files = export_onnx(stage.export_program(program), directory / f"{stage.stem(program)}.onnx")
    return stage.stage_info(program, files, "onnx")


def load_stage(directory: Path, info: dict) -> OnnxStage:
    return OnnxStage(directory / info["files"][0], label=Path(info["files"][0]).stem)
