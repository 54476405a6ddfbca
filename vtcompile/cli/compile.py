"""Commands that compile a model with passes: optimize, calibrate, eval, flops."""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError, PassConfigError
from .common import (calibration_arg, check_artifact_flags, compile_from_args, model_args, model_name, parse_passes,
                     pass_args, spec_of, target_arg)


def cmd_optimize(args) -> int:
    from ..artifacts import check_destination
    from ..evaluate import self_check, self_check_table

    if args.out:
        check_destination(args.out, args.force)
    counts = image_size_counts(args)  # checked before anything is compiled
    cm = compile_from_args(args, args.target)
    for n in counts:  # the program of each visual-token count asked for, built (and lowered) now: the artifact holds it
        cm.executable(n)
    check = None if args.no_check else self_check(cm)
    saved = cm.save(args.out, force=args.force) if args.out else None
    if args.json:
        print(json.dumps({"report": cm.report.to_dict(), "check": check, "artifact": str(saved) if saved else None},
                         indent=2))
        return 0
    print(cm.report.summary_table())
    print(cm.report.layer_table())
    if cm.report.exits:
        print(cm.report.exit_table())
    if check:
        print(self_check_table(check))
    print(f"artifact written to {saved}" if saved else "no artifact written (give --out DIR to write one)")
    return 0


def cmd_calibrate(args) -> int:
    """Fit the recipe of one calibrating pass and write it (JSON, tensors in a .safetensors file beside it)."""
    from ..errors import ArtifactError

    passes = parse_passes(args)
    if len(passes) != 1 or passes[0][0].calibrate is None:
        from ..passes import REGISTRY

        users = ", ".join(n for n, p in REGISTRY.items() if p.calibrate is not None)
        raise PassConfigError(f"vtcompile calibrate takes exactly one calibrating --pass (one of: {users})")
    if args.out.exists() and not args.force:
        raise ArtifactError(f"{args.out} already exists; choose another --out or pass --force")
    cm = compile_from_args(args)
    recipe = cm.recipes[passes[0][0].name]
    written = recipe.save(args.out)
    print(cm.report.summary_table())
    if cm.report.exits:
        print(cm.report.exit_table())
    print("written: " + ", ".join(map(str, written)))
    hint = recipe.reuse(written)
    if hint:
        print(f"reuse with {hint}")
    return 0


def cmd_eval(args) -> int:
    from ..api import load_compiled
    from ..data import check_data_arg
    from ..evaluate import evaluate, result_table

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, found {args.limit}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, found {args.batch_size}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, found {args.max_new_tokens}")
    check_data_arg(args.data)
    if args.artifact:
        check_artifact_flags(args, args.artifact, what="--artifact", seed=True)
        cm = load_compiled(args.artifact)
    else:
        cm = compile_from_args(args)
    res = evaluate(cm, args.data, limit=args.limit, batch_size=args.batch_size, skip_bad=args.skip_bad,
                   max_new_tokens=args.max_new_tokens, progress=not args.quiet)
    print(json.dumps(res, indent=2) if args.json else result_table(res))
    return 0


def image_size_counts(args) -> list[int]:
    """The visual-token counts of optimize's --image-size arguments (dynamic-resolution families)."""
    from ..models import family_of_config, model_config

    if not args.image_size:
        return []
    config = model_config(spec_of(args))
    family = family_of_config(config)
    return sorted({family.visual_tokens_for_size(config, *parse_image_size(s)) for s in args.image_size})


def parse_image_size(text: str) -> tuple[int, int]:
    """'HxW' in pixels -> (H, W)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise InputError(f"--image-size {text!r}: expected HEIGHTxWIDTH in pixels, e.g. 448x448")
    return int(parts[0]), int(parts[1])


def cmd_flops(args) -> int:
    from ..models import family_of_config, geometry_of, model_config
    from ..models.presets import PRESETS
    from ..report import flops_tables, static_report

    passes = parse_passes(args)
    if args.images < 1 or args.text_tokens < 1:
        raise InputError(f"--images and --text-tokens must be >= 1, found {args.images} and {args.text_tokens}")
    name = model_name(args)
    if name in PRESETS and not args.weights:
        args.random_weights = not PRESETS[name].shipped  # FLOPs need only the geometry, never weights
    spec = spec_of(args)
    geom = geometry_of(spec)
    per_image = geom.visual_tokens_per_image
    if args.image_size is not None:
        config = model_config(spec)
        per_image = family_of_config(config).visual_tokens_for_size(config, *parse_image_size(args.image_size))
    n_visual = per_image * args.images
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[spec.dtype]
    report, branches, label = static_report(geom, passes, n_visual, args.text_tokens, dtype_bytes)
    if args.json:
        d = report.to_dict()
        print(json.dumps(dict(d, branches=branches, branch_label=label) if branches else d, indent=2))
        return 0
    print(flops_tables(report, branches, label, args.text_tokens, spec.dtype))
    return 0


def register(sub) -> None:
    p = sub.add_parser("optimize", help="compile a model with pruning passes, print the report, save an artifact",
                       description="Capture the model, apply the passes in the given order, lower to the target, "
                                   "print the FLOPs / token / KV-cache report and a fidelity self-check, and (with "
                                   "--out) write an artifact directory.")
    model_args(p)
    pass_args(p)
    target_arg(p)
    p.add_argument("--out", type=Path, metavar="DIR", help="write the artifact here (refused if it exists)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at --out (refused when the "
                                                        "directory is not an artifact or holds files its manifest "
                                                        "does not list)")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text length for true FLOPs and KV bytes "
                                                               "(default 64)")
    p.add_argument("--no-check", action="store_true", help="skip the fidelity self-check against the unpruned model")
    p.add_argument("--image-size", metavar="HxW", action="append", default=[],
                   help="dynamic-resolution families (Qwen2-VL): also build the program for images of this size in "
                        "pixels (each visual-token count has its own program; an artifact holds the ones built). "
                        "Repeatable; the family's reference size (448x448) is always built")
    calibration_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("eval", help="accuracy and fidelity on VQA data (the testbed test split or a JSONL file)",
                       description="Exact-match accuracy of WHOLE generated answers (greedy, until eos, at most "
                                   "--max-new-tokens) per question kind and overall, compared after the VQA "
                                   "convention's normalisation (lower case, punctuation and the articles a/an/the "
                                   "removed, number words as digits), the share of answers that end, "
                                   "fidelity against the unpruned model (answers identical, token agreement, "
                                   "first-token agreement and KL), FLOPs ratios, visual tokens kept, wall time "
                                   "(compiling excluded, given apart). --max-new-tokens 1 scores the next token "
                                   "instead (the answer must be one token). JSONL lines: {\"image\": "
                                   "path, \"question\": str, \"answer\": str, \"kind\": optional str}.")
    model_args(p)
    pass_args(p)
    calibration_arg(p)
    p.add_argument("--artifact", type=Path, metavar="DIR", help="evaluate a saved artifact instead of --model/--pass")
    p.add_argument("--data", default="testbed", help="'testbed' (default: its test split) or a JSONL file")
    p.add_argument("--limit", type=int, help="evaluate at most N samples (testbed default 500)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per batch (default 16)")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="longest generated answer (default 24); 1 scores the next token (single-token answers)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines, unreadable images and, "
                                                           "with --max-new-tokens 1, answers that are not one token "
                                                           "of the vocabulary, instead of failing")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="fit the recipe of a pass that calibrates on data, and write it",
                       description="Run the calibration of one pass (`vtcompile passes` marks the passes that "
                                   "calibrate) and write its recipe: fields as JSON, tensors in a .safetensors file "
                                   "beside it. The command prints the --pass that reuses it.")
    model_args(p)
    pass_args(p)
    calibration_arg(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE.json", help="where to write the recipe")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("flops", help="FLOPs, visual tokens and KV-cache bytes per layer of a pass recipe (no weights)",
                       description="Analytic FLOPs from the model geometry: paper convention (visual tokens only, "
                                   "4nd^2+2n^2d+3ndm per layer) and true FLOPs (all tokens, 2xMAC, LM head); KV-cache "
                                   "bytes of the prompt after prefill (model dtype), unpruned and pruned. Passes "
                                   "with branches decided at run time get one row per branch.")
    model_args(p)
    pass_args(p)
    p.add_argument("--images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--image-size", metavar="HxW", default=None,
                   help="each image's size in pixels, for dynamic-resolution families (Qwen2-VL: (H/14)(W/14)/4 "
                        "visual tokens); default: the family's reference image (Qwen2-VL 448x448; LLaVA's count is "
                        "fixed)")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text length (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_flops)
