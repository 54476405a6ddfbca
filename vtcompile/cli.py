"""The `vtcompile` command: thin commands over the API. Arguments are checked before any model is loaded; every
error a user can fix is one line on stderr and a non-zero exit code; a flag that would be ignored is an error that
says what applies. Progress and compile messages go through `logging` (stderr, "[vtcompile] ..."), never into
stdout, where answers, tables and JSON go. A closed stdout (`| head`) ends the command quietly with 141 (128 +
SIGPIPE), Ctrl-C with 130 (128 + SIGINT), as shells report commands killed by those signals."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import textwrap
import time
from dataclasses import fields
from pathlib import Path

from .errors import InputError, PassConfigError, VtcompileError

log = logging.getLogger("vtcompile.cli")
EXIT_BROKEN_PIPE = 141
EXIT_INTERRUPTED = 130


def _log(msg: str) -> None:
    log.info(msg)


def _model_args(p: argparse.ArgumentParser, seed_help: str = "seed of random weights (default 0)") -> None:
    from .models import DEFAULT_MODEL

    g = p.add_argument_group("model")
    g.add_argument("--model", default=None,
                   help=f"preset name (see `vtcompile models`) or a local checkpoint directory "
                        f"(default: {DEFAULT_MODEL})")
    g.add_argument("--weights", metavar="DIR", help="local checkpoint directory for a preset")
    g.add_argument("--random-weights", action="store_true",
                   help="build the preset's real geometry with random weights (speed/FLOPs work; every report "
                        "says so)")
    g.add_argument("--layers", type=int, metavar="N", help="keep only the first N decoder layers (CPU speed work)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="weight dtype (default: float32; bfloat16 for the 7B/13B presets)")
    g.add_argument("--seed", type=int, default=None, help=seed_help)


def _pass_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pass", dest="passes", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="a pass to apply, with optional fields, e.g. fastv:k=2,r=0.5; repeat --pass to compose "
                        "passes in order (see `vtcompile passes`)")


def _calibration_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calibration", metavar="DATA",
                   help="calibration data for passes that fit a recipe (fitprune, dyvte): 'testbed' (its train "
                        "split; the default on the testbed model), a JSONL file (as for eval), or 'synthetic' "
                        "(random prompts, for random-weight smoke tests)")


def _target_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None,
                   help="backend: eager (default, the rewritten graphs in PyTorch), inductor (AOTInductor: compiled "
                        "ahead of time, one compile for every batch, prompt length and decode step; an artifact "
                        "loads without compiling), onnx (ONNX Runtime; float32 on CPU; prefill and decode), "
                        "tensorrt (CUDA + torch-tensorrt; prefill only)")


def _model_name(args) -> str:
    from .models import DEFAULT_MODEL

    return args.model if args.model is not None else DEFAULT_MODEL


def _spec(args):
    from .models import resolve_spec

    return resolve_spec(_model_name(args), args.weights, args.random_weights, args.layers, args.dtype,
                        args.seed if args.seed is not None else 0)


def _passes(args) -> list:
    """The --pass values, parsed (before any model is loaded)."""
    from .passes import REGISTRY, resolve_passes

    for spec in args.passes:
        name, _, rest = spec.partition(":")
        if "," in name or any(part.strip() in REGISTRY for part in rest.split(",")):
            raise PassConfigError(f"--pass {spec!r} names several passes; give each its own --pass, in order "
                                  "(e.g. --pass fastv --pass pyramiddrop)")
    return resolve_passes(args.passes)


def _check_calibration_flag(args, passes) -> None:
    """--calibration with no pass that calibrates would be ignored: an error, as compile_pruned's."""
    if getattr(args, "calibration", None) is not None and not any(p.calibrate for p, _ in passes):
        from .passes import REGISTRY

        names = ", ".join(p.name for p, _ in passes) or "no pass"
        users = ", ".join(n for n, p in REGISTRY.items() if p.calibrate is not None)
        raise PassConfigError(f"--calibration applies to passes that fit a recipe on data ({users}); {names} "
                              "fit(s) none: drop --calibration")


def _calibration(args, passes, spec) -> str | None:
    """--calibration, or on the shipped testbed its train split for passes that need data."""
    needs = [p.name for p, c in passes if p.calibrate is not None and c.needs_calibration()]
    if args.calibration is None and needs and spec.name == "testbed":
        _log(f"{', '.join(needs)}: calibrating on 64 prompts of the testbed's train split (--calibration to change)")
        return "testbed"
    return args.calibration


def _compile(args, target: str = "eager"):
    """Check the arguments, then load the model and compile it with the passes."""
    from .compiled import CompiledModel
    from .models import build_from_spec
    from .targets import get_target

    passes = _passes(args)
    _check_calibration_flag(args, passes)
    tgt = get_target(target or "eager")
    spec = _spec(args)
    calibration = _calibration(args, passes, spec)
    _log(f"loading {spec.label} ...")
    t0 = time.perf_counter()
    adapter = build_from_spec(spec)
    for p, cfg in passes:
        p.check_supports(adapter.geometry)
        cfg.check_model(adapter.geometry)
    _log(f"loaded in {time.perf_counter() - t0:.1f}s; capturing the decoder and applying {len(passes)} pass(es) ...")
    cm = CompiledModel.build(adapter, passes, tgt, getattr(args, "text_tokens", 64), calibration=calibration)
    r = cm.report
    _log(f"compiled in {r.capture_seconds + r.calibration_seconds + r.compile_seconds:.1f} s (capture "
         f"{r.capture_seconds:.1f} s, calibration {r.calibration_seconds:.1f} s, passes + lowering to "
         f"{tgt.name} {r.compile_seconds:.1f} s)")
    return cm


def cmd_optimize(args) -> int:
    from .artifacts import check_destination

    if args.out:
        check_destination(args.out, args.force)
    cm = _compile(args, args.target)
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
        from tabulate import tabulate

        print(tabulate([[check["prompt"], check["n"], f"{check['top1_agreement']:.3f}", f"{check['mean_kl']:.2e}",
                         check["verdict"]]],
                       headers=["self-check prompts", "rows", "top-1 agreement vs unpruned", "mean KL", "verdict"],
                       tablefmt="simple_outline"))
    print(f"artifact written to {saved}" if saved else "no artifact written (give --out DIR to write one)")
    return 0


def self_check(cm, agreement_floor: float = 0.9) -> dict:
    """Next-token fidelity of the compiled model vs the unpruned model, judged: on the testbed its val questions,
    elsewhere a synthetic left-padded batch. Agreement below the floor is a warning in the verdict."""
    import torch

    from .metrics import next_token_fidelity
    from .models.llava import example_inputs
    from .runtime.inputs import prepare

    if cm.spec.name == "testbed":
        from .data import PromptEncoder, load_data, sample_image

        data, _ = load_data("testbed", limit=16, split="val")
        ids, pixels, mask = PromptEncoder(cm.frontend.processor).batch([s.question for s in data],
                                                                      [sample_image(s) for s in data])
        what = "16 testbed val questions"
    else:
        ids, pixels, mask = example_inputs(cm.adapter, batch=2)
        what = "synthetic, 2 rows, left padding"
    out = cm(ids, pixels, mask)
    with torch.no_grad():
        ref = cm.adapter.model(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                               position_ids=prepare(cm.frontend, ids, pixels, mask).position_ids).logits
    fid = next_token_fidelity(ref[:, -1], out.logits[:, -1])
    ok = fid["top1_agreement"] >= agreement_floor
    verdict = "ok" if ok else (f"WARNING: the pruned model's next token differs from the unpruned one on "
                               f"{1 - fid['top1_agreement']:.0%} of the prompts")
    if not ok:
        _log(verdict)
    return dict(fid, prompt=what, verdict=verdict)


def cmd_calibrate(args) -> int:
    """Fit the recipe of one calibrating pass and write it as JSON."""
    from .errors import ArtifactError

    passes = _passes(args)
    if len(passes) != 1 or passes[0][0].calibrate is None:
        raise PassConfigError("vtcompile calibrate takes exactly one calibrating --pass (e.g. fitprune:budget=0.5)")
    if args.out.exists() and not args.force:
        raise ArtifactError(f"{args.out} already exists; choose another --out or pass --force")
    cm = _compile(args)
    recipe = cm.recipes[passes[0][0].name]
    written = recipe.save(args.out)  # JSON, and its tensors in a .safetensors file beside it
    print(cm.report.summary_table())
    if cm.report.exits:
        print(cm.report.exit_table())
    print("written: " + ", ".join(map(str, written)))
    hint = recipe.reuse(written)
    if hint:
        print(f"reuse with {hint}")
    return 0


def cmd_eval(args) -> int:
    from .api import load_compiled
    from .data import check_data_arg
    from .evaluate import evaluate, result_table

    if args.limit is not None and args.limit < 1:
        raise InputError(f"--limit must be >= 1, found {args.limit}")
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, found {args.batch_size}")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, found {args.max_new_tokens}")
    check_data_arg(args.data)
    if args.artifact:
        if args.passes:
            raise VtcompileError("--artifact already holds its passes; drop --pass")
        given = [f"--{f.replace('_', '-')}" for f in _MODEL_FLAGS if getattr(args, f, None) not in (None, False)]
        given += ["--seed"] if args.seed is not None else []
        if given:
            raise VtcompileError(f"{', '.join(given)} do(es) not apply to --artifact, which holds its model and "
                                 "passes; drop them, or evaluate --model/--pass without --artifact")
        cm = load_compiled(args.artifact)
    else:
        cm = _compile(args)
    res = evaluate(cm, args.data, limit=args.limit, batch_size=args.batch_size, skip_bad=args.skip_bad,
                   max_new_tokens=args.max_new_tokens)
    print(json.dumps(res, indent=2) if args.json else result_table(res))
    return 0


def cmd_flops(args) -> int:
    from tabulate import tabulate

    from .compiler.flops import fmt_bytes, fmt_flops
    from .models import geometry_of
    from .models.presets import PRESETS
    from .report import Report, layer_table, static_report

    passes = _passes(args)
    if args.images < 1 or args.text_tokens < 1:
        raise InputError(f"--images and --text-tokens must be >= 1, found {args.images} and {args.text_tokens}")
    name = _model_name(args)
    if name in PRESETS and not args.weights:
        args.random_weights = not PRESETS[name].shipped  # FLOPs need only the geometry, never weights
    spec = _spec(args)
    geom = geometry_of(spec)
    n_visual = geom.visual_tokens_per_image * args.images
    dtype_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[spec.dtype]
    report, branches, label = static_report(geom, passes, n_visual, args.text_tokens, dtype_bytes)
    d = report.to_dict()
    if args.json:
        print(json.dumps(dict(d, branches=branches, branch_label=label) if branches else d, indent=2))
        return 0
    print(layer_table(report))
    if branches:
        print(f"The saving depends on the {label} each prompt takes, decided at run time (the table below is "
              f"per way a prompt can run; the rows above and below are the case without a {label}):")
        print(Report.branch_table(branches, label))
    print(tabulate([
        ["paper FLOPs (visual tokens)", fmt_flops(report.baseline_paper), fmt_flops(report.paper),
         f"{d['paper_ratio']:.1%}", f"{1 - d['paper_ratio']:.1%}"],
        [f"true FLOPs ({args.text_tokens} text tokens, 2xMAC)", fmt_flops(report.baseline_true),
         fmt_flops(report.true), f"{d['true_ratio']:.1%}", f"{1 - d['true_ratio']:.1%}"],
        [f"KV cache after prefill ({spec.dtype})", fmt_bytes(report.baseline_kv_bytes), fmt_bytes(report.kv_bytes),
         f"{d['kv_ratio']:.1%}", f"{1 - d['kv_ratio']:.1%}"]],
        headers=["per prompt", "unpruned", f"pruned, no {label}" if branches else "pruned", "ratio", "saved"],
        tablefmt="simple_outline"))
    return 0


def cmd_passes(args) -> int:
    from tabulate import tabulate

    from .passes import REGISTRY

    width = max(60, shutil.get_terminal_size((100, 20)).columns)
    field_width = max(30, width - 45)
    rows = []
    for p in REGISTRY.values():
        fl = "\n".join(textwrap.fill(f"{f.name}={f.default!r}: {f.metadata.get('help', '')}", field_width,
                                     subsequent_indent="  ") for f in fields(p.config))
        rows.append([p.name, textwrap.fill(p.summary, 24), fl])
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
    words = _testbed_words()
    if words:
        width = max(60, shutil.get_terminal_size((100, 20)).columns)
        print(textwrap.fill(f"The testbed knows {len(words)} words (any other word reads as <unk>): "
                            + " ".join(words), width))
    return 0


def _testbed_words() -> list[str]:
    """The words of the shipped testbed's tokenizer (its vocabulary without special tokens)."""
    from .errors import ModelNotFoundError
    from .models import resolve_spec

    try:
        path = Path(resolve_spec("testbed").path) / "tokenizer.json"
        tok = json.loads(path.read_text())
    except (ModelNotFoundError, OSError, ValueError):
        return []
    special = {t["content"] for t in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})
    return sorted(w for w in vocab if w not in special and any(c.isalnum() for c in w))


def cmd_inspect(args) -> int:
    from tabulate import tabulate

    from .artifacts import verify
    from .compiler.flops import fmt_bytes, fmt_flops
    from .errors import ArtifactError
    from .report import _fmt_cfg

    m = verify(args.dir)  # format, versions and the sha256 of every file, as loading checks them
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    try:
        f = m["report"]["flops"]
        rows = [["model", m["report"]["model"]], ["config hash", m["config_hash"]],
                ["passes", "\n".join(p["pass"] + _fmt_cfg(p["config"]) for p in m["passes"]) or "none"],
                ["target", m["target"]], ["generate", m.get("generate", "")],
                ["versions", ", ".join(f"{k} {v}" for k, v in m["versions"].items())],
                ["programs", ", ".join(f"{p['n_visual']} visual tokens ({len(p['stages'])} stage(s)"
                                       + (", decode step" if p.get("decode") else ", no decode step") + ")"
                                       for p in m["programs"])],
                ["visual tokens per layer", " ".join(map(str, f["visual_tokens_per_layer"]))],
                ["paper FLOPs", f"{fmt_flops(f['baseline_paper_tflops'] * 1e12)} -> "
                                f"{fmt_flops(f['paper_tflops'] * 1e12)} (saves {1 - f['paper_ratio']:.1%})"],
                ["true FLOPs", f"{fmt_flops(f['baseline_true_tflops'] * 1e12)} -> {fmt_flops(f['true_tflops'] * 1e12)}"
                               f" (saves {1 - f['true_ratio']:.1%})"],
                ["KV cache after prefill", f"{fmt_bytes(f['baseline_kv_cache_bytes'])} -> "
                                           f"{fmt_bytes(f['kv_cache_bytes'])} (saves {1 - f['kv_ratio']:.1%})"],
                ["files", f"{len(m['files'])}, {fmt_bytes(sum(e['bytes'] for e in m['files'].values()))}, "
                          "sha256 verified"]]
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{args.dir / 'manifest.json'} is corrupt or incomplete ({exc!r})") from None
    print(tabulate(rows, tablefmt="simple_outline"))
    return 0


class _PrintStreamer:
    """Prints each row's answer as its tokens arrive (batch 1), or nothing (the table follows)."""

    def __init__(self, tokenizer, enabled: bool):
        from transformers import TextStreamer

        self.inner = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if enabled else None

    def put(self, value):
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


_MODEL_FLAGS = ("model", "weights", "random_weights", "layers", "dtype", "target", "calibration")


def _check_run_flags(args) -> None:
    """Flags `run` would ignore are errors that say what applies (before anything is loaded)."""
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, found {args.max_new_tokens}")
    if args.dir is not None:
        if args.passes:
            raise VtcompileError("an artifact already holds its passes; give DIR or --model/--pass, not both")
        given = [f"--{f.replace('_', '-')}" for f in _MODEL_FLAGS if getattr(args, f) not in (None, False)]
        if given:
            raise VtcompileError(f"{', '.join(given)} do(es) not apply to an artifact: {args.dir} runs the model, "
                                 "passes and target it was compiled with. Drop them, or compile here with "
                                 "--model/--pass/--target instead of DIR")
        if args.seed is not None and not args.sample:
            raise VtcompileError("--seed seeds sampling (--sample) when running an artifact; greedy decoding "
                                 "ignores it: add --sample or drop --seed")
    if not args.sample:
        given = [flag for flag, v in (("--temperature", args.temperature), ("--top-k", args.top_k),
                                      ("--top-p", args.top_p)) if v is not None]
        if given:
            raise VtcompileError(f"{', '.join(given)} appl(ies) only with --sample; greedy decoding (the default) "
                                 "ignores it: add --sample or drop it")
    if args.prompt and args.input_ids is not None:
        raise VtcompileError("give --prompt (text, read by the model's processor) or --input-ids (token ids), not "
                             "both")


def _parse_input_ids(text: str) -> list[list[int]]:
    try:
        ids = json.loads(text)
        if ids and all(isinstance(t, int) for t in ids):
            ids = [ids]
        if not isinstance(ids, list) or not all(isinstance(r, list) and r and all(isinstance(t, int) for t in r)
                                                for r in ids):
            raise ValueError("not a non-empty list of ints (or of lists of ints, one per prompt)")
    except ValueError as exc:
        raise VtcompileError(f"--input-ids must be a JSON list of token ids, e.g. '[5, 9, 127, 7]', or one list "
                             f"per prompt ({exc})") from None
    return ids


def cmd_run(args) -> int:
    import torch
    from tabulate import tabulate

    from .api import load_compiled
    from .data import prompt_inputs

    _check_run_flags(args)
    prompts = args.prompt or None
    ids = _parse_input_ids(args.input_ids) if args.input_ids is not None else None
    rows = len(ids) if ids is not None else len(prompts or [])
    if rows == 0:
        raise InputError("give --prompt TEXT (repeat for a batch) or --input-ids JSON")
    images = list(args.image)
    if images and len(images) not in (1, rows):
        raise InputError(f"{len(images)} --image for {rows} prompt(s); give one image per prompt (or one for all)")
    for im in images:
        if not im.is_file():
            raise InputError(f"image {im} does not exist" if not im.exists() else f"image {im} is not a file")
    images = images * rows if len(images) == 1 else images or [None] * rows
    if args.dir is not None:
        t0 = time.perf_counter()
        cm = load_compiled(args.dir)
        _log(f"loaded {args.dir} ({cm.target.name}) in {time.perf_counter() - t0:.1f} s")
    else:
        cm = _compile(args, args.target)
    input_ids, pixels, mask = prompt_inputs(cm.frontend, images, prompts, ids)
    generator = torch.Generator().manual_seed(args.seed or 0) if args.sample else None
    tok = cm.frontend.tokenizer
    stream = tok is not None and rows == 1 and not args.json
    sampling = {"temperature": 1.0 if args.temperature is None else args.temperature,
                "top_k": 0 if args.top_k is None else args.top_k, "top_p": 1.0 if args.top_p is None else args.top_p}
    t0 = time.perf_counter()
    out = cm.generate(input_ids, pixels, mask, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                      streamer=_PrintStreamer(tok, stream) if tok is not None else None, generator=generator,
                      **sampling)
    stats = cm.last_generation
    seconds = time.perf_counter() - t0 - stats.compile_seconds - stats.load_seconds
    new = out[:, input_ids.shape[1]:].tolist()
    answers = [tok.decode(r, skip_special_tokens=True).strip() if tok is not None else None for r in new]
    res = {"answers": answers, "token_ids": new, "seconds": seconds, **stats.to_dict(), "target": cm.target.name}
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    table = [[f"answer {i + 1}" if rows > 1 else "answer", a if a is not None else r]
             for i, (a, r) in enumerate(zip(answers, new))]
    table += [["prompt tokens / new tokens", f"{stats.prompt_tokens} / {stats.new_tokens} (batch {stats.batch})"],
              *([["visual tokens exited after layer", " ".join("none" if e < 0 else str(e)
                                                              for e in stats.exit_layers)]]
                if stats.exit_layers else []),
              ["KV cache after prefill", f"{sum(stats.kv_prompt_bytes.values()) / 1e6:.3f} MB"],
              ["time to first token s", f"{stats.ttft_seconds:.3f}"],
              ["decode ms/token, tokens/s", f"{stats.decode_ms_per_token:.1f}, {stats.tokens_per_second:.1f}"],
              *([["compiled / loaded stages s (not in the times)",
                  f"{stats.compile_seconds:.1f} / {stats.load_seconds:.2f}"]]
                if stats.compile_seconds + stats.load_seconds >= 0.005 else []),
              ["target", cm.target.name]]
    print(tabulate(table, tablefmt="simple_outline"))
    return 0


def cmd_testbed_data(args) -> int:
    from .testbed.scenes import write_split

    if args.n < 1:
        raise InputError(f"-n must be >= 1, found {args.n}")
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file; give a directory for <split>.jsonl and images/")
    for split in args.split or ["test"]:
        path = write_split(args.out, split, args.n, args.seed, force=args.force)
        _log(f"wrote {args.n} {split} samples: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vtcompile",
        description="Visual-token pruning for multimodal LLMs as compiled graph passes: capture a LLaVA model "
                    "with torch.export, rewrite the decoder graph with pruning passes, lower it to a backend, "
                    "generate over per-layer KV caches.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("optimize", help="compile a model with pruning passes, print the report, save an artifact",
                       description="Capture the model, apply the passes in the given order, lower to the target, "
                                   "print the FLOPs / token / KV-cache report and a fidelity self-check, and (with "
                                   "--out) write an artifact directory.")
    _model_args(p)
    _pass_args(p)
    _target_arg(p)
    p.add_argument("--out", type=Path, metavar="DIR", help="write the artifact here (refused if it exists)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact at --out (refused when the "
                                                        "directory is not an artifact or holds files its manifest "
                                                        "does not list)")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text length for true FLOPs and KV bytes "
                                                               "(default 64)")
    p.add_argument("--no-check", action="store_true", help="skip the fidelity self-check against the unpruned model")
    _calibration_arg(p)
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
    _model_args(p)
    _pass_args(p)
    _calibration_arg(p)
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

    p = sub.add_parser("flops", help="FLOPs, visual tokens and KV-cache bytes per layer of a pass recipe (no weights)",
                       description="Analytic FLOPs from the model geometry: paper convention (visual tokens only, "
                                   "4nd^2+2n^2d+3ndm per layer) and true FLOPs (all tokens, 2xMAC, LM head); KV-cache "
                                   "bytes of the prompt after prefill (model dtype), unpruned and pruned.")
    _model_args(p)
    _pass_args(p)
    p.add_argument("--images", type=int, default=1, help="images per prompt (default 1)")
    p.add_argument("--text-tokens", type=int, default=64, help="prompt text length (default 64)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser("run", help="answer prompts with a saved artifact or a freshly compiled model",
                       description="Generate answers: from an artifact directory (no model files needed), or from "
                                   "--model with --pass. The answer is printed while it is generated (one prompt); "
                                   "several --prompt (with one --image each, or one --image for all) run as one "
                                   "batch. A prompt already in the model's chat format (with the image token) is "
                                   "used as is. Models without a processor take --input-ids.")
    p.add_argument("dir", type=Path, nargs="?", help="artifact directory (vtcompile optimize ... --out DIR); omit to "
                                                     "compile --model with --pass here")
    _model_args(p, seed_help="seed of the sampling generator with --sample (default 0); when compiling a random-weight "
                             "model here (a tiny preset, --random-weights) also the seed of its weights")
    _pass_args(p)
    _target_arg(p)
    _calibration_arg(p)
    p.add_argument("--image", type=Path, action="append", default=[], help="image file (repeat: one per --prompt)")
    p.add_argument("--prompt", action="append", help="question text (repeat for a batch; needs the processor)")
    p.add_argument("--input-ids", metavar="JSON", help="token ids as a JSON list (or a list of lists); one image "
                                                       "token id per --image")
    p.add_argument("--max-new-tokens", type=int, default=32, help="most new tokens per answer (default 32)")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, help="sampling temperature, with --sample (default 1.0)")
    p.add_argument("--top-k", type=int, help="with --sample: sample from the k most likely tokens (default 0: off)")
    p.add_argument("--top-p", type=float, help="with --sample: nucleus sampling mass (default 1.0: off)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("testbed", help="the shipped testbed model: train it from scratch, write its data as JSONL",
                       description="The testbed is a small LLaVA (CLIP vision tower + Llama decoder) trained on "
                                   "synthetic scenes; its checkpoint ships as package data and is the default "
                                   "--model.")
    tsub = p.add_subparsers(dest="testbed_command", required=True, metavar="ACTION")
    tsub.add_parser("train", add_help=False, help="train a testbed checkpoint from scratch on the CPU "
                                                  "(`vtcompile testbed train --help` lists its options)")
    t = tsub.add_parser("data", help="write testbed splits as PNG images + JSONL (the format `vtcompile eval --data` "
                                     "reads)")
    t.add_argument("--out", type=Path, required=True, metavar="DIR", help="directory for <split>.jsonl and images/")
    t.add_argument("--split", action="append", choices=["train", "val", "test"],
                   help="split to write (repeatable; default: test)")
    t.add_argument("-n", type=int, default=500, help="samples per split (default 500)")
    t.add_argument("--seed", type=int, default=0, help="generator seed (default 0, the shipped model's)")
    t.add_argument("--force", action="store_true", help="replace an existing <split>.jsonl and images/<split>/ in "
                                                        "--out (refused without it)")
    t.set_defaults(func=cmd_testbed_data)

    p = sub.add_parser("passes", help="list the registered passes and their fields")
    p.set_defaults(func=cmd_passes)
    p = sub.add_parser("models", help="list model presets, whether local weights were found, and the words the "
                                      "shipped testbed knows")
    p.set_defaults(func=cmd_models)
    p = sub.add_parser("inspect", help="show an artifact's manifest (after checking its files' sha256)")
    p.add_argument("dir", type=Path, help="artifact directory")
    p.add_argument("--json", action="store_true", help="print the whole manifest")
    p.set_defaults(func=cmd_inspect)

    # `vtcompile serve` lives in vtcompile/serve/command.py: this file's model flags, then the server's own
    from .serve import command as serve_command

    p = sub.add_parser("serve", help=serve_command.HELP, description=serve_command.DESCRIPTION)
    serve_command.add_arguments(p)
    _model_args(p)
    _pass_args(p)
    _target_arg(p)
    _calibration_arg(p)
    p.set_defaults(func=lambda args: serve_command.main(args, compile_model=_compile))
    return parser


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment (a test's capture, a redirected stream), not the one at set-up."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging() -> None:
    """vtcompile's messages on stderr as "[vtcompile] ..." (INFO and up), once per process."""
    logger = logging.getLogger("vtcompile")
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("[vtcompile] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null, so that flushing it at exit raises nothing again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if argv[:2] == ["testbed", "train"]:  # its own parser (argparse's REMAINDER would swallow no leading option)
            from .testbed.train import main as train_main

            return train_main(argv[2:])
        args = build_parser().parse_args(argv)
        _setup_logging()
        try:
            return args.func(args)
        except VtcompileError as exc:
            print(f"vtcompile: error: {exc}", file=sys.stderr)
            return exc.exit_code
        finally:
            sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
    except BrokenPipeError:  # `vtcompile ... | head`: the reader has gone, which is no error of the command
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("vtcompile: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
