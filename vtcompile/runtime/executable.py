"""A program lowered to a target: its prefill stages (with the decision between them) and its decode step.

Every stage - the one stage of a static program, each per-layer stage of a program with branches, the decode
step - goes through the same three target calls (targets/__init__.py): lower, save, load. Stages are lowered at
their first call, so a branch no row takes costs nothing, and compile time is counted apart from run time.
Built from a Program (compile_pruned) or from an artifact's stored stages (load_compiled); the runtime does
not know which.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..compiler.decode import DecodeGraph, decode_graph
from ..compiler.export import export_stage
from ..compiler.program import Program
from ..compiler.signature import Signature
from ..compiler.staged import Stage, StagePlan, stage_examples, stage_program
from ..errors import TargetUnavailableError
from .executor import Executor, PrefillResult
from .inputs import PreparedInputs


class LazyStage:
    """One stage, exported (if the target needs it) and lowered at its first call; compile time kept apart.

    `compile_seconds`: lowering (an AOT compile, an ONNX translation) plus what a JIT backend compiled inside its calls;
    `load_seconds`: loading the stage stored in an artifact (no compilation). Callers that time runs keep both out of
    their timings (CompiledModel.generate, evaluate), so no run time a user reads includes a compile."""

    def __init__(self, stage: Stage, target, examples: Callable[[], tuple] | None = None,
                 loader: Callable[[], Callable] | None = None):
        self.stage = stage
        self.target = target
        self.examples = examples  # real inputs to export the stage's graph with
        self.loader = loader  # or: how to load the stage lowered from an artifact
        self._exported: torch.export.ExportedProgram | None = None
        self.lowered: Callable | None = None
        self.lower_seconds = 0.0

    @property
    def compile_seconds(self) -> float:
        # a JIT stage (targets/inductor.py's JitStage on CUDA) compiles inside its calls and counts that itself
        return (0.0 if self.loader is not None else self.lower_seconds) + \
            getattr(self.lowered, "call_compile_seconds", 0.0)

    @property
    def load_seconds(self) -> float:
        return self.lower_seconds if self.loader is not None else 0.0

    def exported(self) -> torch.export.ExportedProgram:
        if self._exported is None:
            if self.stage.module is None or self.examples is None:
                raise RuntimeError(f"stage {self.stage.name} has neither an exported program nor a graph to export")
            self._exported = export_stage(self.stage, self.examples())
        return self._exported

    def lower(self) -> Callable:
        if self.lowered is None:
            t0 = time.perf_counter()
            if self.loader is not None:
                self.lowered = self.loader()
            else:
                self.lowered = self.target.lower(self.stage, self.exported() if self.target.needs_export else None)
            self.lower_seconds += time.perf_counter() - t0
        return self.lowered

    def warm(self) -> None:
        """Lower now and, on the CPU, run once on the example inputs (a JIT backend compiles then): for a static
        program compile_pruned pays the compile, and a backend that refuses the model says so there."""
        fn = self.lower()
        if self.examples is not None:
            args = self.examples()
            if not any(t.is_cuda for t in args):  # on CUDA the example batch would compile a graph of its own
                fn(*args)

    def __call__(self, *args):
        return self.lower()(*args)


def _wrap(stage: Stage, target, examples: dict) -> Stage:
    return dataclasses.replace(stage, module=LazyStage(stage, target, examples.get(id(stage))))


@dataclass
class Executable:
    """One program on one target: prefill(prepared) -> PrefillResult, and `step`, the decode step."""

    n_visual: int
    schedule: list[int]  # visual tokens in each layer's attention (without a branch)
    plan: StagePlan  # stage modules are LazyStage
    target: object
    decode: LazyStage | None = None
    decode_info: dict = field(default_factory=dict)  # layers, cache shapes, dtype, hidden size
    program: Program | None = None  # the FX program (None when loaded from an artifact)
    _decode_factory: Callable[[bool], DecodeGraph] | None = None

    def __post_init__(self):
        self.executor = Executor(self.plan)

    @property
    def signature(self) -> Signature:
        return self.plan.signature

    def prefill(self, prepared: PreparedInputs) -> PrefillResult:
        return self.executor(*prepared.as_args())

    def step_stage(self) -> LazyStage:
        """The decode step, built (from the program) on first use."""
        if not self.target.decodes:
            raise TargetUnavailableError(
                f"target {self.target.name!r} runs prefill only: its decode step is not implemented "
                f"({self.target.decode_note}). Use target 'eager' or 'inductor' to generate.")
        if self.decode is None:
            if self._decode_factory is None:
                raise TargetUnavailableError("this program has no decode step (its artifact was saved without one); "
                                             "re-create the artifact with this version of vtcompile")
            dg = self._decode_factory(self.target.in_place_decode)
            self.decode_info = dg.info()
            self.decode = LazyStage(dg.stage, self.target, dg.example_inputs)
        return self.decode

    def prefill_stages(self) -> list[LazyStage]:
        """Every distinct prefill stage (one for a static program; per layer and branch with a decision)."""
        return [s.module for s in self.plan.all_stages()]

    def stages(self) -> list[LazyStage]:
        """Every prefill stage, then the decode step if it was built."""
        return self.prefill_stages() + ([self.decode] if self.decode is not None else [])

    def setup_seconds(self) -> tuple[float, float]:
        """(compile, load) seconds spent so far making this program's stages runnable (see LazyStage)."""
        stages = self.stages()
        return sum(s.compile_seconds for s in stages), sum(s.load_seconds for s in stages)


def lower_program(program: Program, target) -> Executable:
    """Stage a program and hand every stage to `target`, lowered at its first call."""
    if target.prepare is not None:
        program = target.prepare(program)
    plan = stage_program(program)
    examples_of = stage_examples(plan, tuple(program.fake_inputs.examples))
    lowered = plan.map_stages(lambda s: _wrap(s, target, examples_of))
    if lowered.decision is None:  # one stage: lowered (and compiled) now; with branches each stage at its first call
        for s in lowered.all_stages():
            s.module.warm()
    return Executable(program.n_visual, list(program.schedule), lowered, target, program=program,
                      _decode_factory=lambda in_place: decode_graph(program, in_place))
