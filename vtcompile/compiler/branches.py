"""Programs with branches: dynamic control flow between decoder layers, one generic mechanism.

A pass that makes branches hands the compiler a branch description (``Branches``): after layer e, the rows its
``Decision`` picks continue in ``programs[e]`` (the same program with other rewrites from layer e + 1 on, e.g. every
visual token removed). Staging (compiler/staged.py), the runtime (runtime/executor.py: regrouping rows that took
different branches), artifacts, the report and the CLI handle any such program without knowing which pass made
it: the decision persists itself (``kind``, ``meta()``, ``state()``) and is rebuilt from an artifact through the
registry below, where the owning pass's module registers its decision class.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # annotations only
    from .geometry import Geometry


class Decision(ABC):
    """Decides, between stages, which rows take a branch. Owned by the pass that makes it."""

    kind: ClassVar[str] = "?"  # registry key (the owning pass's name, plus what it is)
    layers: list[int]  # the layers after which it is asked

    @abstractmethod
    def decide(self, layer: int, hidden: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """[B] bool on the CPU: rows that take the branch after `layer`, from the residual stream after the layer
        [B, S_l, D] and the visual mask of the tokens present there [B, S_l]."""

    @abstractmethod
    def meta(self) -> dict:
        """JSON-able settings that, with state(), rebuild the decision (load)."""

    @abstractmethod
    def state(self) -> dict[str, torch.Tensor]:
        """Its tensors (weights), for an artifact."""

    @classmethod
    @abstractmethod
    def load(cls, meta: dict, state: dict[str, torch.Tensor], geometry: "Geometry") -> "Decision":
        """The decision stored in an artifact, for a model of `geometry`."""


@dataclass
class Branches:
    """The branch description a pass gives a program (see the module docstring)."""

    decision: Decision
    programs: dict[int, object]  # compiler.program.Program per branch (program.py imports this module)
    by: str  # the pass that made them (messages)
    label: str = "branch"  # what taking a branch means, for reports (e.g. "visual-token exit")
    # How many of the pass's calibration prompts the decision sends after each layer (-1: no branch), when the pass
    # calibrated the decision here; None otherwise. The report averages FLOPs over them.
    calibration_prompts: dict[int, int] | None = field(default=None)


DECISIONS: dict[str, type[Decision]] = {}


def register_decision(cls: type[Decision]) -> type[Decision]:
    """Class decorator: make a decision class loadable from artifacts by its `kind`."""
    if DECISIONS.get(cls.kind, cls) is not cls:
        raise ValueError(f"decision kind {cls.kind!r} registered twice")
    DECISIONS[cls.kind] = cls
    return cls


def load_decision(kind: str, meta: dict, state: dict[str, torch.Tensor], geometry: "Geometry") -> Decision:
    if kind not in DECISIONS:
        raise KeyError(f"no decision of kind {kind!r} is registered (known: {', '.join(sorted(DECISIONS))})")
    return DECISIONS[kind].load(meta, state, geometry)
