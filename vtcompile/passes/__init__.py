"""Pass registry and the pass-spec parser shared by the API and the CLI."""
from __future__ import annotations

from ..errors import PassConfigError
from . import (attnskip, cdpruner, dart, divprune, dyvte, fastv, fitprune, gprune, headskip,  # noqa: F401  (registers)
               pyramiddrop, randomdrop)
from .base import REGISTRY, PassConfig, PassDef, describe_fields

__all__ = ["REGISTRY", "PassConfig", "PassDef", "get_pass", "parse_pass_spec", "resolve_passes"]


def get_pass(name: str) -> PassDef:
    try:
        return REGISTRY[name]
    except KeyError:
        raise PassConfigError(f"unknown pass {name!r}; registered passes: {', '.join(sorted(REGISTRY))}") from None


def parse_pass_spec(spec: str) -> tuple[PassDef, PassConfig]:
    """'fastv' or 'fastv:k=3,r=0.75' -> (pass, config)."""
    name, _, rest = spec.partition(":")
    p = get_pass(name.strip())
    values = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise PassConfigError(f"{p.name}: expected key=value in {spec!r}, found {item!r}; "
                                  f"fields are: {describe_fields(p.config)}")
        values[key.strip()] = value.strip()
    return p, p.config.from_dict(values)


def resolve_passes(passes) -> list[tuple[PassDef, PassConfig]]:
    """Accept a name/spec string, a config object, (name, {field: value}), or a list of those."""
    if passes is None:
        return []
    if isinstance(passes, (str, PassConfig, tuple)):
        passes = [passes]
    out = []
    for item in passes:
        if isinstance(item, str):
            out.append(parse_pass_spec(item))
        elif isinstance(item, PassConfig):
            out.append((get_pass(item.name), item))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], dict):
            p = get_pass(item[0])
            out.append((p, p.config.from_dict(item[1])))
        else:
            raise PassConfigError(
                f"cannot read pass {item!r}; give a name ('fastv'), a spec ('fastv:k=2,r=0.5'), a config object "
                "(FastVConfig(k=2)) or a (name, {field: value}) tuple")
    return out
