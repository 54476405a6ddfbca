"""Python entry points: compile_pruned() and load_compiled()."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tabulate import tabulate

from . import __version__
from .compiler.flops import FlopsReport, fmt_flops
from .compiler.program import capture_decoder
from .compiler.runtime import PrunedOutput, StagedRuntime
from .errors import VtcompileError
from .models import DEFAULT_MODEL, LlavaAdapter, ModelSpec, load_model
from .passes import PassConfig, resolve_passes
from .targets import get_target

DEFAULT_TEXT_TOKENS = 64


@dataclass
class Report:
    """What a compile did: model, passes, FLOPs per layer, times. Printed as tables by the CLI."""

    model: str
    random_weights: bool
    passes: list[dict]
    target: str
    flops: FlopsReport
    capture_seconds: float
    compile_seconds: float
    calibration_seconds: float = 0.0
    rewrites: list[dict] = field(default_factory=list)
    recipes: dict = field(default_factory=dict)
    # Dynamic exits (dyvte with routers): one row per way a prompt can run - no exit (after_layer -1), then
    # every candidate exit - with its FLOPs ratios and, when the routers were calibrated here, the share of the
    # calibration prompts the routers send that way. The flops field above is the no-exit (worst) case.
    exits: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "random_weights": self.random_weights, "passes": self.passes,
                "target": self.target, "flops": self.flops.to_dict(), "rewrites": self.rewrites,
                "recipes": {name: {k: v for k, v in r.items() if not k.startswith("_")}
                            for name, r in self.recipes.items()},
                "exits": self.exits, "expected_on_calibration": self.expected_on_calibration(),
                "capture_seconds": self.capture_seconds,
                "calibration_seconds": self.calibration_seconds, "compile_seconds": self.compile_seconds}

    def expected_on_calibration(self) -> dict | None:
        """Paper/true FLOPs ratios averaged over the calibration prompts, each run the way its routers send it
        (dynamic exits calibrated here only; None otherwise)."""
        rows = [r for r in self.exits if r.get("calibration_prompts") is not None]
        n = sum(r["calibration_prompts"] for r in rows)
        if not rows or not n:
            return None
        return {"prompts": n, **{k: sum(r[k] * r["calibration_prompts"] for r in rows) / n
                                 for k in ("paper_ratio", "true_ratio")}}

    def summary_table(self) -> str:
        f = self.flops
        case = "  without an exit" if self.exits else ""
        rows = [
            ["model", self.model],
            ["passes", ", ".join(p["pass"] + _fmt_cfg(p["config"]) for p in self.passes) or "none"],
            ["target", self.target],
            ["visual tokens (per row)", f"{f.n_visual} -> {f.schedule[-1]} (last layer)"
             + ("; 0 after an exit" if self.exits else "")],
            ["paper FLOPs (visual tokens only)",
             f"{fmt_flops(f.baseline_paper)} -> {fmt_flops(f.paper)}  ({f.paper / f.baseline_paper:.1%}){case}"],
            [f"true FLOPs ({f.n_text} text tokens, 2xMAC)",
             f"{fmt_flops(f.baseline_true)} -> {fmt_flops(f.true)}  ({f.true / f.baseline_true:.1%}){case}"],
            *_expected_rows(self.expected_on_calibration()),
            *[[f"{name} recipe", _fmt_recipe(r)] for name, r in self.recipes.items()],
            ["capture (torch.export) s", f"{self.capture_seconds:.2f}"],
            *([["calibration s", f"{self.calibration_seconds:.2f}"]] if self.calibration_seconds > 0.01 else []),
            ["passes + lowering s", f"{self.compile_seconds:.2f}"],
        ]
        return tabulate(rows, tablefmt="simple_outline")

    def layer_table(self) -> str:
        return layer_table(self.flops)

    def exit_table(self) -> str:
        """Dynamic exits: FLOPs of each way a prompt can run and where the routers sent the calibration
        prompts ("" without dynamic exits)."""
        if not self.exits:
            return ""
        rows = [["none" if r["after_layer"] < 0 else f"after layer {r['after_layer']}", f"{r['paper_ratio']:.1%}",
                 f"{r['true_ratio']:.1%}",
                 "-" if r.get("calibration_prompts") is None else r["calibration_prompts"]] for r in self.exits]
        return tabulate(rows, headers=["visual-token exit", "paper FLOPs", "true FLOPs", "calibration prompts"],
                        tablefmt="simple_outline")


def _expected_rows(expected: dict | None) -> list[list[str]]:
    if not expected:
        return []
    return [[f"expected FLOPs ({expected['prompts']} calibration prompts)",
             f"paper {expected['paper_ratio']:.1%}, true {expected['true_ratio']:.1%} (each prompt exits where its "
             "routers send it)"]]


def exit_rows(program, text_tokens: int, counts: dict[int, int] | None) -> list[dict]:
    """Report.exits for a program with dynamic exits: the no-exit schedule, then each continuation's."""
    ways = [(-1, program)] + sorted(program.exits.items())
    rows = []
    for e, p in ways:
        f = FlopsReport(program.geometry, program.n_visual, text_tokens, list(p.schedule), list(p.mlp_schedule))
        rows.append({"after_layer": e, "paper_ratio": f.paper / f.baseline_paper, "true_ratio": f.true / f.baseline_true,
                     "calibration_prompts": None if counts is None else counts.get(e, 0)})
    return rows


def layer_table(flops: FlopsReport) -> str:
    """Per-layer visual tokens (attention / MLP half) and FLOPs."""
    rows = [[r["layer"], r["visual_tokens"], r["visual_tokens_mlp"], r["tokens"], f"{r['paper_gflops']:.4g}",
             f"{r['true_gflops']:.4g}"] for r in flops.rows()]
    return tabulate(rows, headers=["layer", "visual (attn)", "visual (MLP)", "tokens", "paper GFLOPs", "true GFLOPs"],
                    tablefmt="simple_outline")


def _fmt_recipe(r: dict) -> str:
    if "exit_label_rate" in r:
        rates = " ".join(f"L{k}:{v:.0%}" for k, v in r["exit_label_rate"].items())
        return f"routers at layers {r['layers']}; exit-label rate {rates}; {r['samples']} prompts"
    removed = " ".join(f"L{k}:-{v}" for k, v in r.get("removed", {}).items()) or "removes nothing"
    extra = ""
    if "paper_ratio" in r:
        met = "met" if r.get("budget_met") else "NOT met"
        extra = f"  (budget {r['budget']:.2f}: {r['paper_ratio']:.1%} of paper FLOPs, {met}; alpha {r['alpha']:.3f})"
    return removed + extra


def calibration_batches(runtime, calibration, samples: int, n_visual: int) -> list[tuple]:
    """Decoder-stage inputs for calibration, one prompt per batch, each with n_visual image tokens."""
    from .models.llava import example_inputs

    if isinstance(calibration, str) and calibration == "synthetic":
        items = [example_inputs(runtime.adapter, batch=1, seed=1000 + i) for i in range(samples)]
    elif isinstance(calibration, str):  # 'testbed' (its train split) or a JSONL file, through the processor
        from .evaluate import PROMPT_TEMPLATE, PromptEncoder, load_data, open_image

        data, _ = load_data(calibration, limit=samples, split="train")
        enc = PromptEncoder(runtime.adapter.processor, PROMPT_TEMPLATE)
        items = [enc.batch([s], [open_image(s)]) for s in data]
    elif isinstance(calibration, (list, tuple)):
        items = list(calibration)[:samples]
    else:
        raise VtcompileError(f"calibration data {calibration!r} is not understood; give 'testbed', a JSONL file, "
                             "a list of (input_ids, pixel_values, attention_mask) tuples, or 'synthetic'")
    batches = []
    for item in items:
        if isinstance(item, dict):
            item = (item["input_ids"], item.get("pixel_values"), item.get("attention_mask"))
        prepared = runtime.prepare(*item)
        if prepared.n_visual != n_visual:
            raise VtcompileError(f"calibration prompts must hold one image ({n_visual} image tokens per row); "
                                 f"found {prepared.n_visual}")
        batches.append(prepared.as_args())
    if not batches:
        raise VtcompileError("the calibration set is empty; give at least one sample")
    return batches


def _fmt_cfg(cfg: dict) -> str:
    shown = {k: v for k, v in cfg.items() if v not in ("", [], ())}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")" if shown else ""


class CompiledModel:
    """A pruned MLLM: callable like the model, reports what was removed, saves as an artifact."""

    def __init__(self, adapter: LlavaAdapter, passes: list, target: str, text_tokens: int = DEFAULT_TEXT_TOKENS,
                 calibration=None, recipes: dict | None = None, progress: bool = True):
        self.adapter = adapter
        self.passes = passes
        self.target = target
        tgt = get_target(target)
        captured = _captured(adapter)
        self.runtime = StagedRuntime(adapter, captured, passes, tgt.lower, dict(recipes or {}), target,
                                     tgt.lower_exits)
        t1 = time.perf_counter()
        self._calibrate(calibration, progress)
        t_cal = time.perf_counter()
        program = self.runtime.program(adapter.geometry.visual_tokens_per_image)
        t2 = time.perf_counter()
        self.report = Report(
            model=adapter.spec.label, random_weights=adapter.spec.random_weights,
            passes=[{"pass": p.name, "config": c.to_dict()} for p, c in passes], target=target,
            flops=FlopsReport(adapter.geometry, program.n_visual, text_tokens, list(program.schedule),
                              list(program.mlp_schedule)),
            capture_seconds=captured.export_seconds, compile_seconds=t2 - t_cal, calibration_seconds=t_cal - t1,
            rewrites=[r.to_dict() for r in program.rewrites], recipes=dict(self.runtime.recipes),
            exits=exit_rows(program, text_tokens, self._calibration_exits()) if program.exits else [])

    @property
    def recipes(self) -> dict:
        return self.runtime.recipes

    def _calibration_exits(self) -> dict[int, int] | None:
        from .passes.dyvte import calibration_exits

        for p, config in self.passes:
            if p.name == "dyvte" and config.exit_layer < 0:
                return calibration_exits(self.runtime.recipes.get("dyvte"), config.threshold)
        return None

    def _calibrate(self, calibration, progress: bool) -> None:
        """Fit the recipes of calibrating passes that have none, each on the program of the passes before it."""
        from .compiler.pipeline import build_program

        for i, (p, config) in enumerate(self.passes):
            if p.calibrate is None or p.name in self.runtime.recipes or not config.needs_calibration():
                continue
            if calibration is None:
                raise VtcompileError(
                    f"pass {p.name!r} calibrates a recipe and needs calibration data: give calibration= (a list of "
                    "(input_ids, pixel_values, attention_mask), a JSONL file, 'testbed', or 'synthetic' for "
                    f"random-weight smoke tests), or a ready recipe with {p.name}:recipe=FILE.json")
            n_visual = self.adapter.geometry.visual_tokens_per_image
            program = build_program(self.runtime.captured, n_visual, self.passes[:i], self.runtime.recipes)
            batches = calibration_batches(self.runtime, calibration, getattr(config, "samples", 64), n_visual)
            self.runtime.recipes[p.name] = p.calibrate(program, config, batches, progress)

    @property
    def program(self):
        """The Program for one image per prompt."""
        return self.runtime.program(self.adapter.geometry.visual_tokens_per_image)

    def __call__(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> PrunedOutput:
        return self.runtime(input_ids, pixel_values, attention_mask)

    # -- artifacts ---------------------------------------------------------------------------------
    def manifest(self) -> dict:
        import transformers

        return {
            "versions": {"vtcompile": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "model": self.adapter.spec.to_dict(),
            "geometry": self.adapter.geometry.to_dict(),
            "config_hash": self.adapter.geometry.config_hash(),
            "passes": [{"pass": p.name, "config": c.to_dict()} for p, c in self.passes],
            "target": self.target,
            "input_spec": {"inputs": ["input_ids [B,S] int64", "pixel_values [n_images,3,H,W]",
                                      "attention_mask [B,S] (left padding)"],
                           "visual_tokens_per_image": self.adapter.geometry.visual_tokens_per_image,
                           "image_token_id": self.adapter.image_token_id},
            "report": self.report.to_dict(),
        }

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        """Write the artifact directory atomically (temporary directory moved into place).

        Self-contained (vtcompile.artifacts): manifest.json with the sha256 of every file, the model config,
        the token embeddings, the vision stage (.pt2), one decoder stage file per visual-token count built
        (.pt2, or .onnx for the onnx target) and the processor files; it loads without the model files.
        """
        from .artifacts import write_artifact

        return write_artifact(self, out_dir, force=force)


def _captured(adapter: LlavaAdapter):
    """The exported decoder stage of an adapter, captured once: it does not depend on the passes."""
    cap = getattr(adapter, "_vt_captured", None)
    if cap is None:
        cap = capture_decoder(adapter.decoder_stage(), adapter.geometry, adapter.device, adapter.dtype)
        adapter._vt_captured = cap
    return cap


def _as_adapter(model) -> LlavaAdapter:
    if isinstance(model, LlavaAdapter):
        return model
    if isinstance(model, str):
        return load_model(model)
    if isinstance(model, torch.nn.Module):
        name = getattr(model.config, "name_or_path", "") or "in-memory model"
        return LlavaAdapter(model, ModelSpec(name=name, source="in-memory", dtype=str(
            next(model.parameters()).dtype).replace("torch.", "")))
    raise VtcompileError(f"compile_pruned expects a model name, a LlavaForConditionalGeneration or a loaded "
                         f"adapter; found {type(model).__name__}")


def compile_pruned(model=DEFAULT_MODEL, passes=None, target: str = "eager", calibration=None,
                   text_tokens: int = DEFAULT_TEXT_TOKENS, recipes: dict | None = None,
                   progress: bool = True) -> CompiledModel:
    """Capture `model`, apply `passes` in order and lower to `target`.

    model: a preset name / checkpoint directory, a transformers LlavaForConditionalGeneration, or an
    adapter from vtcompile.models.load_model. passes: a name ('fastv'), a spec ('fastv:k=2,r=0.5'), a config
    object, a (name, {field: value}) tuple, or a list of those. calibration: data for passes that calibrate
    (fitprune): a list of (input_ids, pixel_values, attention_mask) or 'synthetic'; giving it when no pass
    calibrates is an error rather than silently ignored. recipes: {pass name: recipe} fitted earlier.
    text_tokens: the prompt length assumed by the FLOPs report's true-FLOPs column.
    """
    resolved = resolve_passes(passes)
    if calibration is not None and not any(p.calibrate for p, _ in resolved):
        names = ", ".join(p.name for p, _ in resolved) or "no passes"
        raise VtcompileError(f"calibration data was given but {names} need(s) none; drop the argument")
    get_target(target)  # fail on an unavailable target before any capture work
    return CompiledModel(_as_adapter(model), resolved, target, text_tokens, calibration, recipes, progress)


def load_compiled(path: str | os.PathLike):
    """Load an artifact written by CompiledModel.save, in any process, without the original model files.

    Refuses, with a message saying what to do, a format or vtcompile/torch version it does not read, a file
    whose sha256 does not match the manifest, and a config whose hash does not match. Returns a
    vtcompile.artifacts.LoadedModel: callable like CompiledModel, with .report, .manifest and .adapter.
    """
    from .artifacts import read_artifact

    return read_artifact(path)


__all__ = ["CompiledModel", "PassConfig", "Report", "compile_pruned", "load_compiled"]
