"""The inductor target: each stage compiled ahead of time by AOTInductor into a package (.pt2: generated C++ and
the shared library built from it, weights inside), so that loading an artifact compiles nothing.

The stage compiled is the stage re-exported with its symbolic dims (compiler/export.py), so one package serves every
batch size, prompt length and cache length, and what an artifact stores is exactly what was compiled and tested in
the process that wrote it. Every stage goes through AOT: the one graph of a static program, each per-layer stage of a
program with branches (compiled at its first call in the process; a stage no row took is compiled when the artifact
is saved), and the decode step, which writes its caches in place (index_copy_ on its inputs: AOTInductor keeps the
input mutation; test_generate.py checks the tokens that read those caches). On the CPU the package's C++ wrapper
calls the kernels without a Python call per kernel (the gpt-fast point about a decode step's many small kernels).

On CUDA, compile_pruned keeps torch.compile (the JIT, `JitStage`) in the process: there the decode step runs under
CUDA graphs (mode "reduce-overhead", the gpt-fast recipe), which an AOTInductor package does not record; artifacts
hold AOTInductor packages on every device (a CUDA package runs on CUDA only; untested here: no GPU).
Compile time is measured apart from run time (runtime/executable.py's LazyStage) and logged with the stage's name.
CPU kernels need a C++ compiler; CUDA kernels need triton (shipped with CUDA builds of torch).
"""
from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

from ..compiler.export import strip_guards

log = logging.getLogger(__name__)

REQUIREMENT = "a C++ compiler (g++ or clang++) for CPU kernels, or CUDA with triton"
NEEDS_EXPORT = True
FORMAT = "pt2"
DECODES = True
DEVICE_BOUND = True  # a package holds kernels for the device it was compiled on
SAVES_LOWERED = True  # the package compiled in the process is the file saved


def is_available() -> bool:
    if torch.cuda.is_available():
        return importlib.util.find_spec("triton") is not None
    return any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def _device(exported: torch.export.ExportedProgram) -> torch.device:
    for n in exported.graph.nodes:
        val = n.meta.get("val")
        if n.op == "placeholder" and isinstance(val, torch.Tensor):
            return val.device
    return torch.device("cpu")


def compile_package(stage, exported: torch.export.ExportedProgram, path: Path) -> float:
    """AOT-compile an exported stage into the package `path`; returns the seconds it took (logged, with a line before
    it starts: a large stage takes minutes)."""
    log.info("inductor: AOT-compiling %s (%s) ...", stage.name, stage.role)
    t0 = time.perf_counter()
    import torch._inductor

    with torch.no_grad():
        torch._inductor.aoti_compile_and_package(exported, package_path=str(path))
    seconds = time.perf_counter() - t0
    log.info("inductor: compiled %s in %.1f s", stage.name, seconds)
    return seconds


# x86 vector ISAs a package's kernels may use, and the ones this CPU runs (ATen's dispatch capability; torch's own
# check at load compiles C++ probe programs - 13 s with a cold cache on a 2-core machine - only to print a warning)
_ISA_RANK = {"INVALID_VEC_ISA": 0, "DEFAULT": 0, "AVX2": 1, "AVX512": 2}


def open_package(path: Path):
    """Load an AOTInductor package without compiling anything, after checking that this machine can run its kernels
    (platform, architecture and, on x86, the vector ISA it was compiled for)."""
    import platform
    import sys

    from torch._inductor.package.package import AOTICompiledModel

    from ..errors import ArtifactError

    loader = torch._C._aoti.AOTIModelPackageLoader
    meta = loader.load_metadata_from_package(str(path), "model")
    here = {"AOTI_PLATFORM": sys.platform, "AOTI_MACHINE": platform.machine()}
    wrong = [f"{k.removeprefix('AOTI_').lower()} {meta[k]} (this machine: {v})" for k, v in here.items()
             if meta.get(k) not in (None, v)]
    isa, cpu = meta.get("AOTI_CPU_ISA", ""), torch.backends.cpu.get_cpu_capability()
    if meta.get("AOTI_DEVICE_KEY") == "cpu" and isa in _ISA_RANK and cpu in _ISA_RANK \
            and _ISA_RANK[isa] > _ISA_RANK[cpu]:
        wrong.append(f"vector ISA {isa} (this CPU: {cpu})")
    if wrong:
        raise ArtifactError(f"{path} was compiled for {', '.join(wrong)}: its kernels cannot run here. Re-create the "
                            "artifact on this machine (vtcompile optimize ... --target inductor --out DIR).")
    return AOTICompiledModel(loader(str(path), "model", False, 1, -1))


class AotStage:
    """A loaded AOTInductor package of one stage; call it with the stage's inputs in order, get its outputs as a
    tuple. `compile_seconds` is the compile that made the package in this process (0 for a package loaded from an
    artifact), `load_seconds` the load."""

    def __init__(self, package: Path, stage, compile_seconds: float = 0.0):
        self.package = Path(package)
        self.label = stage.name
        self.decode = stage.role == "decode"
        self.compile_seconds = compile_seconds
        t0 = time.perf_counter()
        self.runner = open_package(self.package)
        self.load_seconds = time.perf_counter() - t0

    def __call__(self, *args):
        # The package's kernels index inputs with the strides of the export's (contiguous) example inputs and do not
        # check them; the decode step's caches are written in place, so they must be the caller's own (contiguous)
        # tensors, never copies.
        if self.decode:
            if not all(t.is_contiguous() for t in args):
                raise RuntimeError(f"{self.label}: the decode step's inputs must be contiguous (its caches are "
                                   "written in place)")
        else:
            args = [t if t.is_contiguous() else t.contiguous() for t in args]
        with torch.no_grad():
            out = self.runner(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


class JitStage:
    """A torch.compile'd stage (CUDA, in the process that compiled the program); call it with the stage's inputs.

    Every call that brings new shapes marks the stage's symbolic dims dynamic: Dynamo then never specialises on a
    prompt length or a cache length, so a stage compiles once per batch kind (CUDA's SDPA kernel choice asks whether
    batch == 1, so the batch stays a backed symbol and batch 1 and batch > 1 may compile a graph each)."""

    def __init__(self, module: torch.nn.Module, stage):
        self.module = module
        self.stage = stage
        self.label = stage.name
        self.call_compile_seconds = 0.0  # compiled inside calls: LazyStage counts it apart from run time
        self.compiles = 0
        self._fn = None
        self._last_shapes = None

    def _compiled(self):
        if self._fn is None:
            mode = "reduce-overhead" if self.stage.role == "decode" else None
            self._fn = torch.compile(self.module, fullgraph=True, mode=mode)
        return self._fn

    def __call__(self, *args):
        from torch._dynamo.decorators import maybe_mark_dynamic
        from torch._dynamo.utils import counters

        shapes = tuple(t.shape for t in args)
        if shapes == self._last_shapes:  # the last call's graph: its guards pass again, no marks needed
            with torch.no_grad():
                return self._fn(*args)
        marked = []
        for i, t in enumerate(args):
            t = t.detach()  # an alias: the marks stay off the caller's tensors, in-place writes still reach them
            for d in self.stage.dynamic[i]:
                maybe_mark_dynamic(t, d)
            marked.append(t)
        fn = self._compiled()
        graphs = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        with torch.no_grad():
            out = fn(*marked)
        self._last_shapes = shapes
        if counters["stats"]["unique_graphs"] != graphs:
            self.compiles += 1
            self.call_compile_seconds += time.perf_counter() - t0
            log.info("inductor: compiled %s in %.1f s", self.label, time.perf_counter() - t0)
        return out


def lower(stage, exported):
    """CPU: compile the re-exported stage into an AOTInductor package now (in a temporary directory, removed with the
    loaded stage; saving copies the package). CUDA: torch.compile at the first call (see the module docstring)."""
    if _device(exported).type == "cuda":
        return JitStage(strip_guards(exported.module()), stage)
    tmp = Path(tempfile.mkdtemp(prefix="vtcompile-aoti-"))
    try:
        path = tmp / f"{stage.name}.pt2"
        seconds = compile_package(stage, exported, path)
        lowered = AotStage(path, stage, compile_seconds=seconds)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    weakref.finalize(lowered, shutil.rmtree, str(tmp), True)
    return lowered


def save(stage, exported, lowered, directory: Path) -> list[str]:
    """The stage's AOTInductor package as <name>.pt2: the one compiled in this process, or compiled now (a stage that
    was never run, or one that runs under torch.compile on CUDA)."""
    name = f"{stage.name}.pt2"
    if isinstance(lowered, AotStage):
        shutil.copyfile(lowered.package, directory / name)
    else:
        compile_package(stage, exported(), directory / name)
    return [name]


def load(stage, directory: Path, files: list[str]) -> AotStage:
    """Load a stored package: no compilation (a shared library is opened)."""
    return AotStage(directory / files[0], stage)
