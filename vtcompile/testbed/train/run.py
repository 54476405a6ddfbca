"""``train()``: build a fresh testbed model, run the phases, evaluate, and save the checkpoint with its
recipe.json; ``main()``: the command line, derived from ``TrainConfig``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from .. import build, scenes
from .config import TrainConfig, add_arguments, from_args
from .loop import run_phase, val_checker
from .losses import PatchHeads
from .phases import phases as build_phases

DESCRIPTION = "Train the testbed LLaVA from scratch on synthetic scenes (CPU, minutes)."


def train(out_dir: str | os.PathLike, config: TrainConfig | None = None, *, overwrite: bool = False,
          progress: bool = True, **overrides) -> dict:
    """Train a testbed model and save it (weights, config, processor files, recipe.json) to ``out_dir``.

    ``config`` (default ``TrainConfig()``) with ``overrides`` (TrainConfig fields) replaced. The checkpoint is
    written to a temporary directory next to ``out_dir`` and moved into place at the end. Returns the recipe.
    ``threads`` sets torch's thread count for the run; the caller's is restored at the end."""
    import torch

    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True / --overwrite)")
    threads_before = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(int(cfg.threads))
    try:
        return _train(out, cfg, progress)
    finally:  # the caller's thread count again: a training run must not leave its own to the rest of the process
        torch.set_num_threads(threads_before)


def _train(out: Path, cfg: TrainConfig, progress: bool) -> dict:
    import torch
    from tqdm import tqdm

    from ..evaluate import evaluate_generated

    model, processor = build.build_model(cfg.seed)
    tok, ip = processor.tokenizer, processor.image_processor
    enc = build.PromptEncoder(tok)
    torch.manual_seed(cfg.seed)  # the probes' initialisation
    heads = PatchHeads(model.config.vision_config.hidden_size)
    val = list(scenes.iter_samples("val", cfg.seed, cfg.val_size))
    history: list = []
    t0, cpu0 = time.time(), time.process_time()
    check = val_checker(model, processor, val, history, t0)
    phases = build_phases(model, heads, enc, ip, cfg)
    records = []
    for i, phase in enumerate(phases, 1):
        start = time.time()
        run_phase(model, phase, f"{i}/{len(phases)} {phase.name}", cfg.training_attention, cfg.compile_layers,
                  progress=progress, eval_every=cfg.eval_every, val_check=check)
        last = phase.first_index + phase.steps * phase.per_step - 1
        records.append({"phase": f"{i}/{len(phases)} {phase.name}", "steps": phase.steps,
                        "time_s": round(time.time() - start, 1),
                        "lr_schedule": f"linear warmup {phase.warmup} steps, cosine to {phase.final_frac:g} x lr",
                        "train_split": f"train, seed {cfg.seed}, indices {phase.first_index}..{last}", **phase.record})
    train_time, train_cpu = time.time() - t0, time.process_time() - cpu0
    model.eval()

    val_res = evaluate_generated(model, processor, val)
    tqdm.write(_summary(f"final val ({val_res['n']})", val_res))
    recipe = {
        "config": cfg.to_dict(),
        "command": f"python -m vtcompile.testbed.train --out DIR {cfg.command_line()}".strip(),
        "phases": records,
        # what the skip of the shipped-checkpoint generation test reads: answers end with this token
        "answer_end_token": tok.eos_token,
        "answer_loss": "cross-entropy of every answer token and the eos after it, in every turn of the training "
                       "dialogues, summed per answer and averaged over the answers",
        "scoring": "exact match of the whole generated answer: transformers' greedy generate on the chat prompt, "
                   "until eos, at most 24 new tokens (vtcompile.testbed.evaluate.evaluate_generated)",
        "training_attention": f"{cfg.training_attention[0]} in the decoder, {cfg.training_attention[1]} in the "
                              "vision tower; evaluation: the model's own "
                              f"({model.config.text_config._attn_implementation}), eager layers",
        "train_time_s": round(train_time, 1),
        # CPU seconds of every thread: on a shared machine the wall time above is not the recipe's own
        "train_cpu_s": round(train_cpu, 1),
        "threads": torch.get_num_threads(),
        "data": {"generator": "vtcompile.testbed.scenes", "kinds": list(scenes.KINDS), "val_size": cfg.val_size},
        "val_accuracy": {"overall": val_res["overall"], **val_res["per_kind"]},
        "val_eos_rate": val_res["eos_rate"],
        "history": history,
        "geometry": {
            "image_size": build.IMAGE_SIZE,
            "patch_size": build.PATCH_SIZE,
            "visual_tokens": build.NUM_VISUAL_TOKENS,
            "vision": build.VISION,
            "text": build.TEXT,
            "vision_feature_layer": model.config.vision_feature_layer,
            "vision_feature_select_strategy": model.config.vision_feature_select_strategy,
            "parameters": sum(p.numel() for p in model.parameters()),
        },
        "versions": _versions(),
    }
    if cfg.test_size:
        test_res = evaluate_generated(model, processor, list(scenes.iter_samples("test", cfg.seed, cfg.test_size)))
        recipe["data"]["test_size"] = cfg.test_size
        recipe["test_accuracy"] = {"overall": test_res["overall"], **test_res["per_kind"]}
        recipe["test_eos_rate"] = test_res["eos_rate"]
        tqdm.write(_summary(f"test ({test_res['n']})", test_res))
    _save_atomically(model, processor, out, recipe)
    return recipe


def _summary(what: str, res: dict) -> str:
    return (f"{what}: {res['overall']:.4f} " + " ".join(f"{k}={v:.3f}" for k, v in res["per_kind"].items())
            + f" eos={res['eos_rate']:.3f}")


def _versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _save_atomically(model, processor, out: Path, recipe: dict) -> None:
    """Write the checkpoint next to ``out`` and move it into place: a crash never leaves half a checkpoint."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        build.save_checkpoint(model, processor, tmp, recipe)
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    """``python -m vtcompile.testbed.train --out DIR [flags]`` / ``vtcompile testbed train``: one flag per
    ``TrainConfig`` field, plus --out, --overwrite and --no-progress."""
    ap = argparse.ArgumentParser(prog="vtcompile testbed train", description=DESCRIPTION)
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    add_arguments(ap)
    ap.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    try:
        cfg = from_args(a)
    except ValueError as exc:
        ap.error(str(exc))
    recipe = train(a.out, cfg, overwrite=a.overwrite, progress=not a.no_progress)
    print(json.dumps({"out": str(Path(a.out).resolve()), "val_accuracy": recipe["val_accuracy"],
                      "train_time_s": recipe["train_time_s"]}, indent=2))
    return 0
