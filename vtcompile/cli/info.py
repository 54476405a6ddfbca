"""Commands that list and show: passes, models, inspect."""
from __future__ import annotations

import json
import shutil
import textwrap
from dataclasses import fields
from pathlib import Path


def _width() -> int:
    return max(60, shutil.get_terminal_size((100, 20)).columns)


def cmd_passes(args) -> int:
    from tabulate import tabulate

    from ..passes import REGISTRY

    field_width = max(30, _width() - 45)
    rows = []
    for p in REGISTRY.values():
        fl = "\n".join(textwrap.fill(f"{f.name}={f.default!r}: {f.metadata.get('help', '')}", field_width,
                                     subsequent_indent="  ") for f in fields(p.config))
        what = p.summary + (" Calibrates on data (--calibration; `vtcompile calibrate` writes its recipe)."
                            if p.calibrate is not None else "")
        rows.append([p.name, textwrap.fill(what, 24), fl])
    print(tabulate(rows, headers=["pass", "what it does", "fields (default)"], tablefmt="simple_grid"))
    return 0


def cmd_models(args) -> int:
    from tabulate import tabulate

    from ..data import testbed_words
    from ..errors import ModelNotFoundError
    from ..models import known_models, resolve_spec
    from ..models.presets import PRESETS

    rows = []
    for name, desc in known_models():
        if PRESETS[name].random_only:
            status = "random weights only"
        elif PRESETS[name].shipped:
            try:
                status = f"shipped: {resolve_spec(name).path}"
            except ModelNotFoundError:
                status = "checkpoint missing from the package"
        else:
            try:
                status = f"local weights: {resolve_spec(name).path}"
            except ModelNotFoundError:
                status = "no local weights (use --weights DIR or --random-weights)"
        rows.append([name, desc, status])
    print(tabulate(rows, headers=["model", "description", "weights"], tablefmt="simple_grid"))
    words = testbed_words()
    if words:
        print(textwrap.fill(f"The testbed knows {len(words)} words (any other word reads as <unk>): "
                            + " ".join(words), _width()))
    return 0


def cmd_inspect(args) -> int:
    from ..artifacts import verify
    from ..errors import ArtifactError
    from ..report import manifest_table

    m = verify(args.dir)  # format, versions and the sha256 of every file, as loading checks them
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    try:
        table = manifest_table(m)
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{args.dir / 'manifest.json'} is corrupt or incomplete ({exc!r})") from None
    print(table)
    return 0


def register(sub) -> None:
    p = sub.add_parser("passes", help="list the registered passes, their fields, and which calibrate on data")
    p.set_defaults(func=cmd_passes)
    p = sub.add_parser("models", help="list model presets, whether local weights were found, and the words the "
                                      "shipped testbed knows")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("inspect", help="show an artifact's manifest (after checking its files' sha256)")
    p.add_argument("dir", type=Path, help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=cmd_inspect)
