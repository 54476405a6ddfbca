"""What every pass shares: a frozen, validated config dataclass that round-trips through JSON, and a
registry that maps the paper's name to the pass.

A pass is a module with a ``Config`` dataclass and functions
``plan(config, geometry, n_visual, recipe=None) -> [(cut, k_visual), ...]`` (its static token schedule,
used for FLOPs without weights) and ``apply(program, config, recipe=None) -> Program``; calibrating passes
also ``calibrate(program, config, batches, progress) -> Recipe`` (a typed recipe, below). Defaults live only in the
Config; CLI flags are derived from its fields.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
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
    if typing.get_origin(kind) is tuple:  # CLI lists use "/": NAME:layers=8/16/24
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
    # What the pass needs from the model family (models.family.FEATURES: "attention_taps", "image_groups");
    # compile_pruned refuses a model whose family does not provide it. Passes never name a family.
    needs: tuple[str, ...] = ()
    min_layers: int = 1
    calibrate: Callable | None = None  # (program, config, batches, progress) -> an instance of `recipe`
    # calibrate also takes answers= (runtime.inputs.AnswerSteps): the frozen model can answer its calibration prompts
    calibration_answers: bool = False
    recipe: type["Recipe"] | None = None  # what calibrate returns (typed, persists and describes itself)
    # (config, geometry, recipe=None) -> (query heads, k/v heads) per layer, for passes that remove heads or whole
    # attentions: their FLOPs and KV bytes without building the model (`vtcompile flops`)
    heads: Callable | None = None
    # (config, geometry, n_visual) -> (label, {layer e: the token-schedule steps the branch taken after layer e adds})
    # for passes that make branches (compiler.branches), or None when a config of theirs makes none: static reports
    # (`vtcompile flops`) print the FLOPs of every branch, since which one a prompt takes is decided at run time.
    branch_plans: Callable | None = None
    # The pass rewrites the layers themselves (weights, heads, attention blocks), not the token set: listed after a
    # pass that made branches (compiler.branches), it rewrites every branch program too.
    rewrites_layers: bool = False

    def read_recipe(self, value) -> "Recipe | None":
        """A recipe given to compile_pruned: this pass's Recipe, or its JSON form (a dict)."""
        if value is None or self.recipe is None or isinstance(value, self.recipe):
            return value
        if isinstance(value, dict):
            return self.recipe.from_dict(value)
        raise PassConfigError(f"{self.name}: a recipe must be a {self.recipe.__name__} or its dict form, found "
                              f"{type(value).__name__}")

    def check_supports(self, geometry: Geometry) -> None:
        provided = set(geometry.features)
        if "fixed_image_tokens" in provided:  # equal counts per image: each image's tokens are known in any row
            provided.add("image_groups")
        missing = [n for n in self.needs if n not in provided]
        if missing:
            raise UnsupportedModelError(
                f"pass {self.name!r} needs {', '.join(missing)}, which model family {geometry.family!r} does not "
                f"provide (it provides: {', '.join(geometry.features) or 'nothing a pass asks for'})")
        if geometry.num_layers < self.min_layers:
            raise UnsupportedModelError(
                f"pass {self.name!r} needs a decoder with at least {self.min_layers} layers; this model has "
                f"{geometry.num_layers}")


# -- recipes ----------------------------------------------------------------------------------------------------
def tensors_field(help: str):
    """A recipe field holding tensors {name: tensor}: persisted in safetensors beside the JSON, never in reports."""
    return field(default_factory=dict, metadata={"tensors": True, "help": help})


@dataclass
class Recipe:
    """What a calibrating pass fitted: a small dataclass per pass (defined in the pass's file). JSON fields and
    tensor fields (``tensors_field``); it persists itself (``save`` / ``load``: JSON, plus a .safetensors file
    beside it when it has tensors) and describes itself for the report (``describe``), so no caller strips keys or
    branches on a pass name."""

    name: typing.ClassVar[str] = "?"

    def __post_init__(self):
        """Normalise fields read back from JSON (override: e.g. int layer keys)."""

    def describe(self) -> str:
        """One line for the report."""
        return ", ".join(f"{k}={v}" for k, v in self.to_dict().items() if k != "pass")

    def reuse(self, files: list[Path]) -> str:
        """How to use the saved files again (a --pass spec), or ''."""
        return ""

    def to_dict(self) -> dict:
        """The JSON fields (tensors left out), with the pass name."""
        return {"pass": self.name, **{f.name: _jsonable(getattr(self, f.name)) for f in fields(self)
                                      if not f.metadata.get("tensors")}}

    def tensors(self) -> dict:
        """Every tensor field flattened to {field.key: tensor}."""
        return {f"{f.name}.{k}": v for f in fields(self) if f.metadata.get("tensors")
                for k, v in getattr(self, f.name).items()}

    @classmethod
    def from_dict(cls, d: dict, tensors: dict | None = None) -> "Recipe":
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known) - {"pass", "weights_file", "summary"}  # summary: the report's line
        if d.get("pass", cls.name) != cls.name:
            raise PassConfigError(f"{cls.name}: this recipe was fitted by pass {d.get('pass')!r}")
        if unknown:
            raise PassConfigError(f"{cls.name}: unknown recipe field(s) {', '.join(sorted(unknown))}; a recipe has "
                                  f"{', '.join(known)}")
        values = {k: v for k, v in d.items() if k in known and not known[k].metadata.get("tensors")}
        for f in known.values():
            if f.metadata.get("tensors"):
                prefix = f.name + "."
                values[f.name] = {k[len(prefix):]: v for k, v in (tensors or {}).items() if k.startswith(prefix)}
        try:
            return cls(**values)
        except TypeError as exc:
            raise PassConfigError(f"{cls.name}: the recipe misses a field ({exc})") from None

    def save(self, path: str | Path) -> list[Path]:
        """Write the recipe as JSON at `path` (and its tensors as `path`.safetensors); each file written to a
        temporary name and moved into place. Returns the files written."""
        from safetensors.torch import save_file

        from ..files import replace_file, temp_path

        path = Path(path)
        data, written, tensors = self.to_dict(), [path], self.tensors()
        if tensors:
            weights = path.with_suffix(".safetensors")
            tmp = temp_path(weights)
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
            replace_file(tmp, weights)  # safetensors writes 0600: the user's umask decides, as for other files
            data["weights_file"] = weights.name
            written.append(weights)
        tmp = temp_path(path)
        tmp.write_text(json.dumps(data, indent=2))
        replace_file(tmp, path)
        return written

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """A recipe written by save (a clear error for a missing or malformed file)."""
        path = Path(path)
        if not path.is_file():
            raise PassConfigError(f"{cls.name}: recipe file {path} does not exist")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise PassConfigError(f"{cls.name}: recipe file {path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise PassConfigError(f"{cls.name}: recipe file {path} must hold a JSON object")
        tensors = None
        if data.get("weights_file"):
            from safetensors.torch import load_file

            weights = path.parent / data["weights_file"]
            if not weights.is_file():
                raise PassConfigError(f"{cls.name}: recipe {path} names {weights}, which does not exist")
            tensors = load_file(str(weights))
        return cls.from_dict(data, tensors)


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


REGISTRY: dict[str, PassDef] = {}


def register(pass_def: PassDef) -> PassDef:
    if pass_def.name in REGISTRY:
        raise ValueError(f"pass {pass_def.name!r} registered twice")
    REGISTRY[pass_def.name] = pass_def
    return pass_def
