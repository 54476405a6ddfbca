"""The one training loop every phase runs: a learning-rate schedule, the phase's loss, a step of its
optimizer, a progress bar and optional validation checks."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

from .forward import attention, compiled_layers


@dataclass
class Phase:
    """One training phase: ``loss(step)`` builds that step's batch and returns (the loss to minimise, numbers for
    the progress bar); the loop sets the learning rate (linear warmup, then cosine from ``lr`` to
    ``final_frac * lr``), steps ``optimizer`` and clips the gradient norm of ``clip`` to 1 (None: no clipping)."""

    name: str  # "end to end": the progress bar and the val checks say "2/3 end to end"
    steps: int
    optimizer: object  # torch.optim.Optimizer
    lr: float
    warmup: int
    final_frac: float
    loss: Callable[[int], tuple]
    clip: list | None = None
    first_index: int = 0  # the phase's first train-split index (recipe.json)
    per_step: int = 0  # train-split indices a step reads
    validate: bool = True  # val checks every eval_every steps
    record: dict = field(default_factory=dict)  # what recipe.json says about the phase beyond the loop's numbers


def lr_at(step: int, steps: int, lr: float, warmup: int, final_frac: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine from ``lr`` to ``final_frac * lr`` at ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def adamw(named, lr: float, weight_decay: float):
    """(parameters, AdamW) of the end-to-end phases: weight decay on matrices except embeddings and norms."""
    import torch

    decayed = [p.ndim >= 2 and "embed" not in n and "norm" not in n for n, p in named]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(
        [{"params": [p for p, d in zip(params, decayed) if d], "weight_decay": weight_decay},
         {"params": [p for p, d in zip(params, decayed) if not d], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.98), eps=1e-8,
    )
    return params, opt


def run_phase(model, phase: Phase, label: str, attention_impls: tuple[str, str], compile_layers: bool,
              progress: bool = True, eval_every: int = 0, val_check: Callable | None = None) -> None:
    """Train ``model`` through ``phase``; every ``eval_every`` steps (not after the last) call
    ``val_check(step_label, own_attention)`` with the attention implementations the model had before training."""
    import torch
    from tqdm import tqdm

    model.train()
    bar = tqdm(range(phase.steps), desc=f"testbed train ({label})", disable=not progress, dynamic_ncols=True)
    ema: dict[str, float] = {}
    opt = phase.optimizer
    with attention(model, attention_impls) as own, compiled_layers(model, compile_layers):
        for step in bar:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, phase.steps, phase.lr, phase.warmup, phase.final_frac)
            loss, shown = phase.loss(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if phase.clip is not None:
                torch.nn.utils.clip_grad_norm_(phase.clip, 1.0)
            opt.step()
            for k, v in shown.items():
                ema[k] = v if k not in ema else 0.95 * ema[k] + 0.05 * v
            bar.set_postfix({k: f"{v:.3f}" for k, v in ema.items()})
            if val_check and phase.validate and eval_every and (step + 1) % eval_every == 0 and step + 1 < phase.steps:
                val_check(f"{phase.name} {step + 1}", own)


def val_checker(model, processor, val, history: list, t0: float, n: int = 250) -> Callable:
    """A mid-training check on the first ``n`` val questions, whole generated answers (``evaluate_generated``)
    with the model's own attention and eager layers: appended to ``history`` and printed."""

    def check(step_label: str, own: tuple[str, str]) -> None:
        import torch
        from tqdm import tqdm

        from ..evaluate import evaluate_generated

        with attention(model, own), torch.compiler.set_stance("force_eager"):
            r = evaluate_generated(model, processor, val[:n])
        history.append({"step": step_label, f"val{n}": r["overall"], "per_kind": r["per_kind"],
                        "eos_rate": r["eos_rate"], "time_s": round(time.time() - t0, 1)})
        tqdm.write(f"{step_label}: val({n}) {r['overall']:.3f} "
                   + " ".join(f"{k}={v:.2f}" for k, v in r["per_kind"].items())
                   + f" eos={r['eos_rate']:.2f} ({time.time() - t0:.0f} s)")

    return check
