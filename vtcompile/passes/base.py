"""What every pass shares: a frozen, validated config dataclass that round-trips through JSON, and a
registry that maps the paper's name to the pass.

A pass is a module with a ``Config`` dataclass and functions
``plan(config, geometry, n_visual, recipe=None) -> [(cut, k_visual), ...]`` (its static token schedule,
used for FLOPs without weights) and ``apply(program, config, recipe=None) -> Program``; calibrating passes
also ``calibrate(program, config, batches, progress) -> recipe`` (JSON-able dict). Defaults live only in the
Config; CLI flags are derived from its fields.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Callable

from ..compiler.geometry import Geometry
from ..errors import PassConfigError, UnsupportedModelError


def param(default, help: str, low=None, high=None, low_open=False, high_open=False):
    """A config field with its help text and numeric range (checked in __post_init__)."""
    return field(default=default, metadata={"help": help, "low": low, "high": high,
                                            "low_open": low_open, "high_open": high_open})


@dataclass(frozen=True)
class PassConfig:
    """Base of every pass config: range checks from field metadata, JSON round trip."""

    name: typing.ClassVar[str] = "?"

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            kind = _field_type(type(self), f)
            if typing.get_origin(kind) is tuple:
                elem = typing.get_args(kind)[0]
                if not isinstance(value, (tuple, list)):
                    raise PassConfigError(f"{self.name}: field {f.name!r} must be a list of {elem.__name__}, "
                                          f"found {value!r}")
                try:
                    value = tuple(elem(v) if not isinstance(v, bool) else _bad() for v in value)
                except (TypeError, ValueError):
                    raise PassConfigError(f"{self.name}: field {f.name!r} must hold {elem.__name__} values, "
                                          f"found {value!r}") from None
                object.__setattr__(self, f.name, value)
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, f.name, float(value))
                value = float(value)
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, kind)):
                raise PassConfigError(f"{self.name}: field {f.name!r} must be {kind.__name__}, found {value!r}")
            low, high = f.metadata.get("low"), f.metadata.get("high")
            bad_low = low is not None and (value <= low if f.metadata.get("low_open") else value < low)
            bad_high = high is not None and (value >= high if f.metadata.get("high_open") else value > high)
            if bad_low or bad_high:
                lo = "(" if f.metadata.get("low_open") else "["
                hi = ")" if f.metadata.get("high_open") else "]"
                raise PassConfigError(
                    f"{self.name}: {f.name}={value} is out of range; expected {f.name} in {lo}{low}, {high}{hi} "
                    f"({f.metadata.get('help', '')})")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps({"pass": self.name, "config": self.to_dict()}, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "PassConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise PassConfigError(
                f"{cls.name}: unknown field(s) {', '.join(sorted(unknown))}; fields are: {describe_fields(cls)}")
        return cls(**{k: _coerce(cls, k, v) for k, v in d.items()})

    def check_model(self, geometry: Geometry) -> None:
        """Raise if this config does not fit the model (layer out of range...). Override per pass."""

    def needs_calibration(self) -> bool:
        """For passes that calibrate: whether this config still needs data (no recipe given)."""
        return True


def _bad():
    raise TypeError


def _field_type(cls, f) -> type:
    hints = typing.get_type_hints(cls)
    return hints.get(f.name, str)


def _coerce(cls, key: str, value: Any):
    f = next(f for f in fields(cls) if f.name == key)
    kind = _field_type(cls, f)
    if not isinstance(value, str) or kind is str:
        return value
    if typing.get_origin(kind) is tuple:  # CLI lists use '/': pyramiddrop:layers=8/16/24
        elem = typing.get_args(kind)[0]
        try:
            return tuple(elem(v) for v in value.split("/") if v.strip())
        except ValueError:
            raise PassConfigError(f"{cls.name}: field {key!r} expects {elem.__name__} values separated by '/', "
                                  f"got {value!r}") from None
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        return kind(value)
    except ValueError:
        raise PassConfigError(f"{cls.name}: field {key!r} expects {kind.__name__}, got {value!r}") from None


def describe_fields(cls) -> str:
    return "; ".join(f"{f.name} (default {f.default}: {f.metadata.get('help', '')})" for f in fields(cls))


@dataclass(frozen=True)
class PassDef:
    """A registered pass."""

    name: str
    summary: str
    config: type[PassConfig]
    plan: Callable
    apply: Callable
    # What the pass needs from the model family (models.family.FEATURES: "attention_taps", "fixed_image_tokens");
    # compile_pruned refuses a model whose family does not provide it. Passes never name a family.
    needs: tuple[str, ...] = ()
    min_layers: int = 1
    calibrate: Callable | None = None  # (program, config, batches, progress) -> recipe dict
    load_router: Callable | None = None  # (config, geometry, tensors) -> the Router its apply() makes
    calibration_exits: Callable | None = None  # (recipe, config) -> {branch layer (-1: none): calibration prompts}
    # A pass that rewrites the layers themselves (weights, heads, attention), not the token set: listed after a pass
    # that made branches (DyVTE's exits), it rewrites every branch too, so a row that exits runs the same layers.
    rewrites_branches: bool = False

    def check_supports(self, geometry: Geometry) -> None:
        missing = [n for n in self.needs if n not in geometry.features]
        if missing:
            raise UnsupportedModelError(
                f"pass {self.name!r} needs {', '.join(missing)}, which model family {geometry.family!r} does not "
                f"provide (it provides: {', '.join(geometry.features) or 'nothing a pass asks for'})")
        if geometry.num_layers < self.min_layers:
            raise UnsupportedModelError(
                f"pass {self.name!r} needs a decoder with at least {self.min_layers} layers; this model has "
                f"{geometry.num_layers}")


REGISTRY: dict[str, PassDef] = {}


def register(pass_def: PassDef) -> PassDef:
    if pass_def.name in REGISTRY:
        raise ValueError(f"pass {pass_def.name!r} registered twice")
    REGISTRY[pass_def.name] = pass_def
    return pass_def
