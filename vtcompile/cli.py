"""The `vtcompile` command."""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import fields

from .errors import VtcompileError


def _log(msg: str) -> None:
    print(f"[vtcompile] {msg}", file=sys.stderr, flush=True)


def _model_args(p: argparse.ArgumentParser) -> None:
    from .models import DEFAULT_MODEL

    g = p.add_argument_group("model")
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"preset name (see `vtcompile models`) or a local checkpoint directory "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--weights", metavar="DIR", help="local checkpoint directory for a preset")
    g.add_argument("--random-weights", action="store_true",
                   help="build the preset's real geometry with random weights (speed/FLOPs work; every report "
                        "says so)")
    g.add_argument("--layers", type=int, metavar="N", help="keep only the first N decoder layers (CPU speed work)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weight dtype (default: float32; bfloat16 for the 7B/13B presets)")
    g.add_argument("--seed", type=int, default=0, help="seed of random weights (default 0)")


def _pass_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="a pass to apply, with optional fields, e.g. fastv:k=2,r=0.5; repeat to compose in order "
                        "(see `vtcompile passes`)")


def _calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="DATA",
                   help="calibration data for passes that fit a recipe (fitprune, dyvte): 'testbed' (its train "
                        "split), a JSONL file (as for eval), or 'synthetic' (random prompts, for random-weight smoke "
                        "tests)")


def _spec(args):
    from .models import resolve_spec

    return resolve_spec(args.model, args.weights, args.random_weights, args.layers, args.dtype, args.seed)


def cmd_optimize(args) -> int:
    from .api import CompiledModel
    from .errors import ArtifactError
    from .models import build_from_spec
    from .passes import resolve_passes
    from .targets import get_target

    if args.out and args.out.exists() and not args.force:
        raise ArtifactError(f"output directory {args.out} already exists; choose another --out or pass --force")
    passes = resolve_passes(args.passes)
    get_target(args.target)
    spec = _spec(args)
    _log(f"loading {spec.label} ...")
    t0 = time.perf_counter()
    adapter = build_from_spec(spec)
    for p, cfg in passes:
        p.check_supports(adapter.geometry)
        cfg.check_model(adapter.geometry)
    _log(f"loaded in {time.perf_counter() - t0:.1f}s; capturing the decoder and applying "
         f"{len(passes)} pass(es) ...")
    cm = CompiledModel(adapter, passes, args.target, args.text_tokens, calibration=args.calibration)
    check = None if args.no_check else _self_check(cm)
    saved = None
    if args.out:
        saved = cm.save(args.out, force=args.force)
    if args.json:
        print(json.dumps({"report": cm.report.to_dict(), "check": check, "artifact": str(saved) if saved else None},
                         indent=2))
        return 0
    print(cm.report.summary_table())
    print(cm.report.layer_table())
    if cm.report.exits:
        print(cm.report.exit_table())
    if check:
        from tabulate import tabulate

        print(tabulate([[check["prompt"], check["n"], f"{check['top1_agreement']:.3f}", f"{check['mean_kl']:.2e}"]],
                       headers=["self-check prompt", "rows", "top-1 agreement vs unpruned", "mean KL"],
                       tablefmt="simple_outline"))
    if saved:
        print(f"artifact written to {saved}")
    return 0


def cmd_calibrate(args) -> int:
    """Fit the recipe of one calibrating pass and write it as JSON."""
    from .api import CompiledModel
    from .errors import ArtifactError, PassConfigError
    from .models import build_from_spec
    from .passes import resolve_passes

    passes = resolve_passes(args.passes)
    if len(passes) != 1 or passes[0][0].calibrate is None:
        raise PassConfigError("vtcompile calibrate takes exactly one calibrating --pass (e.g. fitprune:budget=0.5)")
    if args.out.exists() and not args.force:
        raise ArtifactError(f"{args.out} already exists; choose another --out or pass --force")
    spec = _spec(args)
    _log(f"loading {spec.label} ...")
    cm = CompiledModel(build_from_spec(spec), passes, "eager", calibration=args.calibration)
    recipe = dict(cm.recipes[passes[0][0].name])
    tensors = recipe.pop("_tensors", None)
    recipe = {k: v for k, v in recipe.items() if not k.startswith("_")}  # in-memory extras (dyvte's router margins)
    written = [args.out]
    if tensors is not None:  # trained weights (dyvte routers) go to safetensors beside the JSON
        from safetensors.torch import save_file

        weights = args.out.with_suffix(".safetensors")
        tmp_w = weights.with_name(f".{weights.name}.tmp")
        save_file(tensors, str(tmp_w))
        tmp_w.replace(weights)
        recipe["weights_file"] = weights.name
        written.append(weights)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(json.dumps(recipe, indent=2))
    tmp.replace(args.out)
    print(cm.report.summary_table())
    if cm.report.exits:
        print(cm.report.exit_table())
    print("written: " + ", ".join(map(str, written)))
    if tensors is not None:
        print(f"reuse with --pass {passes[0][0].name}:routers={written[1]}")
    return 0


def _self_check(cm) -> dict:
    """Next-token fidelity of the compiled model vs the unpruned model on a synthetic prompt batch."""
    import torch

    from .metrics import next_token_fidelity
    from .models.llava import example_inputs

    ids, pixels, mask = example_inputs(cm.adapter, batch=2)
    out = cm(ids, pixels, mask)
    prep = cm.runtime.prepare(ids, pixels, mask)
    with torch.no_grad():
        ref = cm.adapter.model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                               position_ids=prep.position_ids).logits
    return dict(next_token_fidelity(ref[:, -1], out.logits[:, -1]), prompt="synthetic, 2 rows, left padding")


def cmd_eval(args) -> int:
    from pathlib import Path

    from .api import CompiledModel, load_compiled
    from .evaluate import evaluate, result_table
    from .models import build_from_spec
    from .passes import resolve_passes

    if args.data != "testbed" and not Path(args.data).is_file():
        raise VtcompileError(f"data {args.data!r} is neither 'testbed' nor an existing JSONL file")
    if args.artifact:
        if args.passes:
            raise VtcompileError("--artifact already holds its passes; drop --pass")
        cm = load_compiled(args.artifact)
    else:
        passes = resolve_passes(args.passes)
        spec = _spec(args)
        _log(f"loading {spec.label} ...")
        cm = CompiledModel(build_from_spec(spec), passes, "eager", calibration=args.calibration)
    res = evaluate(cm, args.data, limit=args.limit, batch_size=args.batch_size, skip_bad=args.skip_bad)
    print(json.dumps(res, indent=2) if args.json else result_table(res))
    return 0


def cmd_flops(args) -> int:
    from tabulate import tabulate

    from .api import layer_table
    from .compiler.flops import fmt_flops, report_from_plan
    from .models import geometry_of
    from .passes import resolve_passes

    from .models.presets import PRESETS

    passes = resolve_passes(args.passes)
    if args.model in PRESETS and not args.weights:
        args.random_weights = True  # FLOPs need only the preset's geometry, never its weights
    geom = geometry_of(_spec(args))
    n_visual = geom.visual_tokens_per_image * args.images
    steps = []
    for p, cfg in passes:
        p.check_supports(geom)
        cfg.check_model(geom)
        steps += p.plan(cfg, geom, n_visual)
    report = report_from_plan(geom, n_visual, args.text_tokens, steps)
    d = report.to_dict()
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print(layer_table(report))
    print(tabulate([
        ["paper convention (visual tokens)", fmt_flops(report.baseline_paper), fmt_flops(report.paper),
         f"{d['paper_ratio']:.1%}"],
        [f"true ({args.text_tokens} text tokens, 2xMAC)", fmt_flops(report.baseline_true), fmt_flops(report.true),
         f"{d['true_ratio']:.1%}"]], headers=["FLOPs", "baseline", "pruned", "ratio"], tablefmt="simple_outline"))
    return 0


def cmd_passes(args) -> int:
    from tabulate import tabulate

    from .passes import REGISTRY

    rows = []
    for p in REGISTRY.values():
        fl = "\n".join(f"{f.name}={f.default}: {f.metadata.get('help', '')}" for f in fields(p.config))
        rows.append([p.name, p.summary, fl])
    print(tabulate(rows, headers=["pass", "what it does", "fields (default)"], tablefmt="simple_grid"))
    return 0


def cmd_models(args) -> int:
    from tabulate import tabulate

    from .errors import ModelNotFoundError
    from .models import known_models, resolve_spec
    from .models.presets import PRESETS

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
    return 0


def cmd_inspect(args) -> int:
    from tabulate import tabulate

    from .errors import ArtifactError

    mf = args.dir / "manifest.json"
    if not mf.is_file():
        raise ArtifactError(f"{args.dir} is not a vtcompile artifact: no manifest.json")
    try:
        m = json.loads(mf.read_text())
        f = m["report"]["flops"]
        rows = [["model", m["report"]["model"]], ["config hash", m["config_hash"]],
                ["passes", ", ".join(p["pass"] for p in m["passes"]) or "none"], ["target", m["target"]],
                ["versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items())],
                ["visual tokens per layer", " ".join(map(str, f["visual_tokens_per_layer"]))],
                ["paper TFLOPs", f"{f['baseline_paper_tflops']:.3f} -> {f['paper_tflops']:.3f}"],
                ["true TFLOPs", f"{f['baseline_true_tflops']:.3f} -> {f['true_tflops']:.3f}"]]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ArtifactError(f"{mf} is corrupt or incomplete ({exc!r})") from None
    if args.json:
        print(json.dumps(m, indent=2))
    else:
        print(tabulate(rows, tablefmt="simple_outline"))
    return 0


def cmd_run(args) -> int:
    from tabulate import tabulate

    from .api import load_compiled
    from .artifacts import next_token, prompt_inputs

    if args.max_new_tokens != 1:
        raise VtcompileError(f"--max-new-tokens {args.max_new_tokens}: multi-token decoding is not implemented yet "
                             "(it needs the per-layer KV-cache runtime); --max-new-tokens 1 gives the greedy next "
                             "token after the pruned prefill")
    ids = None
    if args.input_ids is not None:
        try:
            ids = json.loads(args.input_ids)
            if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                raise ValueError("not a list of ints")
        except ValueError as exc:
            raise VtcompileError(f"--input-ids must be a JSON list of token ids, e.g. '[5, 9, 127, 7]' "
                                 f"({exc})") from None
    model = load_compiled(args.dir)
    res = next_token(model, *prompt_inputs(model, args.image, args.prompt, ids))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    shown = f"{res['token_id']}" + (f" {res['text']!r}" if res["text"] is not None else "")
    print(tabulate([["next token (greedy)", shown],
                    ["top-5", ", ".join(f"{t['token_id']}" + (f" {t['text']!r}" if t["text"] is not None else "")
                                        + f" {t['prob']:.3f}" for t in res["top"])],
                    ["prompt tokens -> kept", f"{res['prompt_tokens']} -> {res['kept_tokens']} "
                                              f"({res['kept_visual']} visual kept)"],
                    *([["visual tokens exited after layer", "none" if res["exit_layer"] < 0 else res["exit_layer"]]]
                      if res["exit_layer"] is not None else []),
                    ["target", model.target], ["prefill s", f"{res['prefill_seconds']:.3f}"]],
                   tablefmt="simple_outline"))
    return 0


def cmd_testbed_data(args) -> int:
    from .errors import InputError
    from .testbed.scenes import write_split

    if args.n < 1:
        raise InputError(f"-n must be >= 1, found {args.n}")
    for split in args.split or ["test"]:
        path = write_split(args.out, split, args.n, args.seed)
        _log(f"wrote {args.n} {split} samples: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from pathlib import Path

    parser = argparse.ArgumentParser(
        prog="vtcompile",
        description="Visual-token pruning for multimodal LLMs as compiled graph passes: capture a LLaVA model "
                    "with torch.export, rewrite the decoder graph with pruning passes, lower it to a backend.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("optimize", help="compile a model with pruning passes, print the report, save an artifact",
                       description="Capture the model, apply the passes in the given order, lower to the target, "
                                   "print the FLOPs/token report and a fidelity self-check, and (with --out) "
                                   "write an artifact directory.")
    _model_args(p)
    _pass_args(p)
    p.add_argument("--target", default="eager",
                   help="backend: eager (default, the rewritten graphs in PyTorch), inductor (torch.compile, one "
                        "compile for every prompt length), onnx (ONNX Runtime; float32 on CPU), tensorrt (CUDA + "
                        "torch-tensorrt)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write the artifact here (refused if it exists)")
    p.add_argument("--force", action="store_true", help="replace an existing --out directory")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text length for true FLOPs (default 64)")
    p.add_argument("--no-check", action="store_true", help="skip the fidelity self-check against the unpruned model")
    _calibration_arg(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("eval", help="accuracy and fidelity on VQA data (the testbed test split or a JSONL file)",
                       description="Exact-match accuracy per question kind and overall, fidelity against the "
                                   "unpruned model (top-1 agreement, KL of the answer distribution), FLOPs ratios, "
                                   "visual tokens kept, wall time. JSONL lines: {\"image\": path, \"question\": "
                                   "str, \"answer\": single-token str, \"kind\": optional str}.")
    _model_args(p)
    _pass_args(p)
    _calibration_arg(p)
    p.add_argument("--artifact", type=Path, metavar="DIR", help="evaluate a saved artifact instead of --model/--pass")
    p.add_argument("--data", default="testbed", help="'testbed' (default: its test split) or a JSONL file")
    p.add_argument("--limit", type=int, help="evaluate at most N samples (testbed default 500)")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward (default 16)")
    p.add_argument("--skip-bad", action="store_true", help="skip (and count) malformed lines, unreadable images, "
                                                           "answers outside the vocabulary, instead of failing")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("calibrate", help="fit a calibrating pass's recipe (fitprune, dyvte) and write it",
                       description="Run the calibration of one pass and write the recipe: fitprune's attention "
                                   "statistics and budget search (reuse with fitprune:recipe=FILE.json), or dyvte's "
                                   "router training (weights in FILE.safetensors; reuse with "
                                   "dyvte:routers=FILE.safetensors).")
    _model_args(p)
    _pass_args(p)
    _calibration_arg(p)
    p.add_argument("--out", type=Path, required=True, metavar="FILE.json", help="where to write the recipe")
    p.add_argument("--force", action="store_true", help="replace an existing --out file")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("flops", help="FLOPs and visual tokens per layer of a pass recipe (no weights needed)",
                       description="Analytic FLOPs from the model geometry: paper convention (visual tokens only, "
                                   "4nd^2+2n^2d+3ndm per layer) and true FLOPs (all tokens, 2xMAC, LM head).")
    _model_args(p)
    _pass_args(p)
    p.add_argument("--images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text length for true FLOPs (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("run", help="run a prompt through a saved artifact (no model files needed)",
                       description="Load an artifact in this process and answer one prompt with a greedy prefill: "
                                   "the next token after the prompt. Needs the artifact's processor for --prompt; "
                                   "artifacts without one (tiny random models) take --input-ids.")
    p.add_argument("dir", type=Path, help="artifact directory (vtcompile optimize ... --out DIR)")
    p.add_argument("--image", type=Path, help="image file")
    p.add_argument("--prompt", help="question text (needs the artifact's processor)")
    p.add_argument("--input-ids", metavar="JSON", help="token ids as a JSON list; one image token id per --image")
    p.add_argument("--max-new-tokens", type=int, default=1, help="only 1 for now (greedy next token)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("testbed", help="the shipped testbed model: train it from scratch, write its data as JSONL",
                       description="The testbed is a small LLaVA (CLIP vision tower + Llama decoder) trained on "
                                   "synthetic scenes; its checkpoint ships as package data and is the default "
                                   "--model.")
    tsub = p.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    t = tsub.add_parser("train", add_help=False, help="train a testbed checkpoint from scratch on the CPU "
                                                      "(`vtcompile testbed train --help` lists its options)")
    t = tsub.add_parser("data", help="write testbed splits as PNG images + JSONL (the format `vtcompile eval --data` "
                                     "reads)")
    t.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for <split>.jsonl and images/")
    t.add_argument("--split", action="append", choices=["train", "val", "test"],
                   help="split to write (repeatable; default: test)")
    t.add_argument("-n", type=int, default=500, help="samples per split (default 500)")
    t.add_argument("--seed", type=int, default=0, help="generator seed (default 0, the shipped model's)")
    t.set_defaults(func=cmd_testbed_data)

    p = sub.add_parser("passes", help="list the registered passes and their fields")
    p.set_defaults(func=cmd_passes)
    p = sub.add_parser("models", help="list model presets and whether local weights were found")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("inspect", help="show an artifact's manifest")
    p.add_argument("dir", type=Path, help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["testbed", "train"]:  # its own parser (argparse's REMAINDER would swallow no leading option)
        from .testbed.train import main as train_main

        return train_main(argv[2:])
    args = build_parser().parse_args(argv)

    try:
        return args.func(args)
    except VtcompileError as exc:
        print(f"vtcompile: error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
