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

    def __init__(self, path: Path, exported=None, label: str = "", inputs: list[str] | tuple = stage.INPUT_NAMES):
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
        self.input_names = list(inputs)
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


def export_onnx(ep, path: Path, inputs=stage.INPUT_NAMES, outputs=stage.OUTPUT_NAMES) -> list[str]:
    """Translate an exported program to ONNX at `path`; returns the file names written (model, weights)."""
    try:
        onnx_program = torch.onnx.export(ep, dynamo=True, input_names=list(inputs), output_names=list(outputs),
                                         optimize=True, verbose=False)
    except Exception as exc:  # noqa: BLE001 - re-raised with what was exported
        raise UnsupportedModelError(f"torch.onnx.export of {path.stem} failed: {type(exc).__name__}: {exc}") from exc
    onnx_program.save(str(path))
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name))


def _session_in_temp(ep, label: str, inputs=stage.INPUT_NAMES, outputs=stage.OUTPUT_NAMES) -> OnnxStage:
    """Translate `ep` to ONNX in a temporary directory (removed with the stage) and open a session on it."""
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vtcompile-onnx-"))
    try:
        files = export_onnx(ep, tmp / f"{label}.onnx", inputs, outputs)
        lowered = OnnxStage(tmp / files[0], exported=ep, label=label, inputs=inputs)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    lowered.files = files
    lowered.compile_seconds = time.perf_counter() - t0  # translation + session
    weakref.finalize(lowered, shutil.rmtree, str(tmp), True)
    print(f"[vtcompile] onnx: exported {label} and opened an ONNX Runtime session "
          f"({', '.join(lowered.providers)}) in {lowered.compile_seconds:.1f}s", file=sys.stderr, flush=True)
    return lowered


def lower(program) -> OnnxStage:
    chosen = providers()
    _check_dtype(program.fake_inputs.examples[0].dtype, chosen)
    t0 = time.perf_counter()
    lowered = _session_in_temp(stage.export_program(program), stage.stem(program))
    lowered.compile_seconds = time.perf_counter() - t0  # export + translation + session
    return lowered


def _copy_files(lowered: OnnxStage, directory: Path) -> list[str]:
    for name in lowered.files:
        shutil.copyfile(lowered.path.parent / name, directory / name)
    return list(lowered.files)


def save_stage(program, lowered: OnnxStage, directory: Path) -> dict:
    if isinstance(lowered, OnnxStage):
        files = _copy_files(lowered, directory)
    else:
        files = export_onnx(stage.export_program(program), directory / f"{stage.stem(program)}.onnx")
    return stage.stage_info(program, files, "onnx")


def load_stage(directory: Path, info: dict) -> OnnxStage:
    return OnnxStage(directory / info["files"][0], label=Path(info["files"][0]).stem)


# -- per-layer stages of programs with dynamic exits (targets/staged.py) ------------------------------------
def lower_graph_stage(ep, label: str, inputs: list[str], outputs: list[str], batched: list[bool]) -> OnnxStage:
    return _session_in_temp(ep, label, inputs, outputs)


def save_graph_stage(ep, lowered, directory: Path, name: str, inputs: list[str], outputs: list[str]) -> list[str]:
    if isinstance(lowered, OnnxStage):
        return _copy_files(lowered, directory)
    return export_onnx(ep, directory / f"{name}.onnx", inputs, outputs)


def load_graph_stage(directory: Path, files: list[str], label: str, inputs: list[str], outputs: list[str],
                     batched: list[bool]) -> OnnxStage:
    return OnnxStage(directory / files[0], label=label, inputs=inputs)


def lower_exits(program):
    """A program with dynamic exits: every per-layer stage exported to ONNX at its first call."""
    from .staged import lower_exit_program

    _check_dtype(program.fake_inputs.examples[0].dtype, providers())
    return lower_exit_program(program, lower_graph_stage)
