"""`vtcompile run`: answer prompts with an artifact or a freshly compiled model, streaming the answer."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ..errors import InputError, VtcompileError
from .common import calibration_arg, check_artifact_flags, compile_from_args, model_args, pass_args, target_arg

log = logging.getLogger("vtcompile.cli")


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


def _check_run_flags(args) -> None:
    """Flags `run` would ignore are errors that say what applies (before anything is loaded)."""
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be >= 1, found {args.max_new_tokens}")
    if args.dir is not None:
        check_artifact_flags(args, args.dir, what="an artifact")
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


def _images(args, rows: int) -> list:
    images = list(args.image)
    if images and len(images) not in (1, rows):
        raise InputError(f"{len(images)} --image for {rows} prompt(s); give one image per prompt (or one for all)")
    for im in images:
        if not im.is_file():
            raise InputError(f"image {im} does not exist" if not im.exists() else f"image {im} is not a file")
    return images * rows if len(images) == 1 else images or [None] * rows


def _table(answers, new, stats, target: str) -> str:
    from tabulate import tabulate

    rows = len(new)
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
              ["target", target]]
    return tabulate(table, tablefmt="simple_outline")


def cmd_run(args) -> int:
    import torch

    from ..api import load_compiled
    from ..data import prompt_inputs

    _check_run_flags(args)
    prompts = args.prompt or None
    ids = _parse_input_ids(args.input_ids) if args.input_ids is not None else None
    rows = len(ids) if ids is not None else len(prompts or [])
    if rows == 0:
        raise InputError("give --prompt TEXT (repeat for a batch) or --input-ids JSON")
    images = _images(args, rows)
    if args.dir is not None:
        t0 = time.perf_counter()
        cm = load_compiled(args.dir)
        log.info(f"loaded {args.dir} ({cm.target.name}) in {time.perf_counter() - t0:.1f} s")
    else:
        cm = compile_from_args(args, args.target)
    batch = prompt_inputs(cm.frontend, images, prompts, ids)
    generator = torch.Generator().manual_seed(args.seed or 0) if args.sample else None
    tok = cm.frontend.tokenizer
    stream = tok is not None and rows == 1 and not args.json
    sampling = {"temperature": 1.0 if args.temperature is None else args.temperature,
                "top_k": 0 if args.top_k is None else args.top_k, "top_p": 1.0 if args.top_p is None else args.top_p}
    t0 = time.perf_counter()
    out = cm.generate(**batch, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                      streamer=_PrintStreamer(tok, stream) if tok is not None else None, generator=generator,
                      **sampling)
    stats = cm.last_generation
    seconds = time.perf_counter() - t0 - stats.compile_seconds - stats.load_seconds
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    answers = [tok.decode(r, skip_special_tokens=True).strip() if tok is not None else None for r in new]
    if args.json:
        print(json.dumps({"answers": answers, "token_ids": new, "seconds": seconds, **stats.to_dict(),
                          "target": cm.target.name}, indent=2))
    else:
        print(_table(answers, new, stats, cm.target.name))
    return 0


def register(sub) -> None:
    p = sub.add_parser("run", help="answer prompts with a saved artifact or a freshly compiled model",
                       description="Generate answers: from an artifact directory (no model files needed), or from "
                                   "--model with --pass. The answer is printed while it is generated (one prompt); "
                                   "several --prompt (with one --image each, or one --image for all) run as one "
                                   "batch. A prompt already in the model's chat format (with the image token) is "
                                   "used as is. Models without a processor take --input-ids.")
    p.add_argument("dir", type=Path, nargs="?", help="artifact directory (vtcompile optimize ... --out DIR); omit to "
                                                     "compile --model with --pass here")
    model_args(p, seed_help="seed of the sampling generator with --sample (default 0); when compiling a random-weight "
                            "model here (a tiny preset, --random-weights) also the seed of its weights")
    pass_args(p)
    target_arg(p)
    calibration_arg(p)
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
