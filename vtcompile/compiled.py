"""CompiledModel: the one compiled-model type. Built from a model (compile_pruned) or from an artifact
(load_compiled); callable like the model (pruned prefill), generates text, saves as an artifact."""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .compiler.flops import FlopsReport
from .compiler.pipeline import build_program
from .compiler.program import Captured, Program, capture_decoder
from .errors import ArtifactError, InputError, VtcompileError
from .models import Family, ModelSpec
from .report import Report, exit_rows
from .runtime.executable import Executable, lower_program
from .runtime.cache import CachePool
from .runtime.executor import PrefillResult, merge_rows
from .runtime.generate import GenerationConfig, GenerationStats, generate
from .runtime.inputs import PreparedInputs, prepare

DEFAULT_TEXT_TOKENS = 64
log = logging.getLogger(__name__)
_DTYPE_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


@dataclass
class PrunedOutput:
    """Logits of the kept positions, in original order, and which positions those are."""

    logits: torch.Tensor  # [B, S_kept, V]
    kept_positions: torch.Tensor  # [B, S_kept], original indices
    kept_visual: torch.Tensor  # [B, S_kept], True where the kept position is an image token
    # Dynamic exits: per row, the layer after which its visual tokens exited (-1: none). Rows that exit at
    # different layers keep different numbers of positions; shorter rows are left-padded with position -1.
    exit_layers: list[int] | None = None
    outputs: dict | None = None  # every output of the prefill signature by name (per-layer K/V, key positions)


def captured(adapter: Family) -> Captured:
    """The exported decoder stage of an adapter, captured once: it does not depend on the passes."""
    cap = getattr(adapter, "_vt_captured", None)
    if cap is None:
        cap = capture_decoder(adapter.decoder_stage(), adapter.geometry, adapter.device, adapter.dtype)
        adapter._vt_captured = cap
    return cap


def _setup(stages) -> float:
    """Seconds spent compiling or loading these (lazy) stages so far."""
    return sum(s.compile_seconds + s.load_seconds for s in stages)


def _decode_note(target) -> str:
    return ("compiled decode step over per-layer KV caches" if target.decodes
            else f"not on this target: {target.decode_note}")


class CompiledModel:
    """A pruned MLLM on a target: `cm(input_ids, pixel_values, attention_mask)` runs the pruned prefill,
    `cm.generate(...)` answers, `cm.report` says what was removed and saved, `cm.save(DIR)` writes an artifact.

    Programs are specialised to the number of visual tokens per prompt and built on first use for each count (one
    image per prompt up front); a model loaded from an artifact runs the counts it was saved with."""

    def __init__(self, frontend, spec: ModelSpec, passes: list, target, report: Report,
                 executables: dict[int, Executable], recipes: dict | None = None, adapter: Family | None = None,
                 captured: Captured | None = None, source: Path | None = None, manifest: dict | None = None):
        self.frontend = frontend
        self.spec = spec
        self.passes = passes
        self.target = target
        self.report = report
        self.executables = executables
        self.recipes = dict(recipes or {})
        self.adapter = adapter  # the live model (None for an artifact)
        self.captured = captured
        self.source = source  # the artifact directory this was loaded from
        self._manifest = manifest
        self.last_generation: GenerationStats | None = None
        self.cache_pool = CachePool()  # decode caches kept between generate calls of the same shapes

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def build(cls, adapter: Family, passes: list, target, text_tokens: int = DEFAULT_TEXT_TOKENS,
              calibration=None, recipes: dict | None = None, progress: bool = True) -> "CompiledModel":
        """Capture the adapter's decoder, calibrate passes that need a recipe, apply the passes, lower."""
        cap = captured(adapter)
        by_name = {p.name: p for p, _ in passes}
        unknown = sorted(set(recipes or {}) - set(by_name))
        if unknown:
            raise VtcompileError(f"recipes were given for {', '.join(unknown)}, which the passes "
                                 f"({', '.join(by_name) or 'none'}) do not include")
        recipes = {name: by_name[name].read_recipe(r) for name, r in (recipes or {}).items()}
        cm = cls(adapter.frontend, adapter.spec, passes, target, report=None, executables={}, recipes=recipes,
                 adapter=adapter, captured=cap)
        t1 = time.perf_counter()
        cm._calibrate(calibration, progress)
        t_cal = time.perf_counter()
        exe = cm.executable(adapter.geometry.visual_tokens_per_image)
        t2 = time.perf_counter()
        program = exe.program
        dtype_bytes = _DTYPE_BYTES.get(adapter.dtype, 4)
        cm.report = Report(
            model=adapter.spec.label, random_weights=adapter.spec.random_weights,
            passes=[{"pass": p.name, "config": c.to_dict()} for p, c in passes], target=target.name,
            flops=FlopsReport(adapter.geometry, program.n_visual, text_tokens, list(program.schedule),
                              list(program.mlp_schedule), dtype_bytes, list(program.q_heads),
                              list(program.kv_heads), list(program.adapted)),
            capture_seconds=cap.export_seconds, compile_seconds=t2 - t_cal, calibration_seconds=t_cal - t1,
            rewrites=[r.to_dict() for r in program.rewrites],
            recipes={name: dict(r.to_dict(), summary=r.describe()) for name, r in cm.recipes.items()},
            exits=exit_rows(program, text_tokens, dtype_bytes) if program.branches else [],
            branch_label=program.branches.label if program.branches else "branch",
            decode=_decode_note(target))
        return cm

    def with_target(self, target: str) -> "CompiledModel":
        """The same programs (capture, passes, recipes) lowered to another target: compare backends on one
        compile, or keep an eager reference beside a compiled model."""
        from .targets import get_target

        if self.captured is None:
            raise ArtifactError("a model loaded from an artifact runs on the target it was saved for; compile the "
                                "model with compile_pruned(..., target=...) for another target")
        tgt = get_target(target)
        exes = {n: lower_program(e.program, tgt) for n, e in self.executables.items()}
        report = dataclasses.replace(self.report, target=tgt.name, decode=_decode_note(tgt))
        return CompiledModel(self.frontend, self.spec, self.passes, tgt, report, exes, self.recipes, self.adapter,
                             self.captured)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CompiledModel":
        from .artifacts import read_artifact

        c = read_artifact(path)
        # The recipes' JSON fields, as the report stored them (their tensors live in the stages and decisions)
        stored = c.manifest.get("report", {}).get("recipes", {})
        recipes = {p.name: p.recipe.from_dict(stored[p.name]) for p, _ in c.passes
                   if p.recipe is not None and p.name in stored}
        return cls(c.frontend, c.spec, c.passes, c.target, c.report, c.executables, recipes=recipes, source=c.path,
                   manifest=c.manifest)

    def _calibrate(self, calibration, progress: bool) -> None:
        """Fit the recipes of calibrating passes that have none, each on the program of the passes before it."""
        from .data import calibration_prompts
        from .runtime.inputs import AnswerSteps

        wanted = [(i, p, c) for i, (p, c) in enumerate(self.passes)
                  if p.calibrate is not None and p.name not in self.recipes and c.needs_calibration()]
        if not wanted:
            return
        n_visual = self.frontend.geometry.visual_tokens_per_image
        for i, p, config in wanted:
            if calibration is None:
                raise VtcompileError(
                    f"pass {p.name!r} calibrates a recipe and needs calibration data: give --calibration DATA on "
                    "the command line (calibration= in Python): 'testbed', a JSONL file, or 'synthetic' for "
                    "random-weight smoke tests; or a recipe fitted before (recipes= in Python; on the command line "
                    f"the field of {p.name!r} that takes `vtcompile calibrate`'s file, where it has one: `vtcompile "
                    "passes` lists the fields)")
            program = build_program(self.captured, n_visual, self.passes[:i], self.recipes)
            batches = []
            for item in calibration_prompts(self.frontend, calibration, getattr(config, "samples", 64)):
                prepared = self.prepare(**item)
                if prepared.n_visual != n_visual:
                    raise InputError(f"calibration prompts must hold one image ({n_visual} image tokens per row); "
                                     f"found {prepared.n_visual}")
                batches.append(prepared.as_args())
            if not batches:
                raise InputError("the calibration set is empty; give at least one sample")
            extra = {"answers": AnswerSteps.of(self.frontend)} if p.calibration_answers else {}
            self.recipes[p.name] = p.calibrate(program, config, batches, progress, **extra)

    # -- programs ----------------------------------------------------------------------------------
    def executable(self, n_visual: int) -> Executable:
        """The lowered program for prompts with `n_visual` visual tokens per row (built on first use)."""
        if n_visual not in self.executables:
            if self.captured is None:
                have = ", ".join(f"{n} ({n // max(1, self.frontend.geometry.visual_tokens_per_image)} image(s))"
                                 for n in sorted(self.executables))
                raise InputError(f"the artifact {self.source} holds programs for {have} visual tokens per prompt; "
                                 f"this prompt has {n_visual}. Each visual-token count has its own program: run "
                                 "the compiled model once on a prompt with such images before saving it (or give "
                                 "prompts with the images it was saved for)")
            program = build_program(self.captured, n_visual, self.passes, self.recipes)
            self.executables[n_visual] = lower_program(program, self.target)
        return self.executables[n_visual]

    @property
    def program(self) -> Program:
        """The Program (FX graph) for one image per prompt; a loaded artifact has stored stages only."""
        exe = self.executable(self.frontend.geometry.visual_tokens_per_image)
        if exe.program is None:
            raise ArtifactError("a model loaded from an artifact holds lowered stages, not the FX program; compile "
                                "the model with compile_pruned to inspect its program")
        return exe.program

    def program_for(self, n_visual: int) -> Program:
        return self.executable(n_visual).program

    def prepare(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                **images) -> PreparedInputs:
        """Checked, merged decoder inputs of a prompt batch (what the programs take); image_features: the vision
        stage's output (frontend.image_features) when it ran beforehand, instead of pixel_values; images: the
        family's other processor outputs (frontend.image_inputs, e.g. Qwen2-VL's image_grid_thw)."""
        return prepare(self.frontend, input_ids, pixel_values, attention_mask, image_features, **images)

    def row_groups(self, prepared: PreparedInputs) -> list[tuple[torch.Tensor | None, Executable]]:
        """(rows, the program for their visual-token count) per count in the batch; rows None: the whole batch.
        Rows whose images differ in size (dynamic resolution) hold different counts: each group runs the program of
        its count, so every row keeps its own share of its own visual tokens."""
        self._check_image_groups(prepared)
        counts = prepared.visual_mask.sum(1)
        values = sorted(set(counts.tolist()))
        if len(values) == 1:
            return [(None, self.executable(values[0]))]
        return [((counts == n).nonzero().flatten(), self.executable(n)) for n in values]

    def _check_image_groups(self, prepared: PreparedInputs) -> None:
        """A family without a fixed count per image tells each image's tokens apart only in rows of one image (its
        programs take a row's visual tokens as one image: models.family.FEATURES 'image_groups')."""
        geometry = self.frontend.geometry
        wanting = [p.name for p, _ in self.passes if "image_groups" in p.needs]
        if not wanting or "fixed_image_tokens" in geometry.features:
            return
        vis = prepared.visual_mask
        runs = (vis[:, 1:] & ~vis[:, :-1]).sum(1) + vis[:, 0].long()  # image runs per row
        several = (runs > 1).nonzero().flatten().tolist()
        if several:
            raise InputError(f"row(s) {several} hold several images; {', '.join(wanting)} keep(s) a share of each image "
                             f"and, for model family {geometry.family!r} (images of different sizes), tells images "
                             "apart in rows of one image only. Give one image per prompt, or use a pass that removes "
                             "tokens inside the decoder instead")

    def prefill(self, prepared: PreparedInputs) -> PrefillResult:
        """The pruned prefill of a prepared batch: one program, or one per visual-token count (row_groups), their
        outputs merged into one batch like rows that branch (runtime.executor.merge_rows: left-padded per output)."""
        groups = self.row_groups(prepared)
        if groups[0][0] is None:
            return groups[0][1].prefill(prepared)
        batch = prepared.input_ids.shape[0]
        parts, exits, branched = [], [-1] * batch, False
        for rows, exe in groups:
            result = exe.prefill(prepared.select(rows))
            parts.append((rows.to(prepared.input_ids.device), result.values))
            if result.exit_layers is not None:
                branched = True
                for row, layer in zip(rows.tolist(), result.exit_layers):
                    exits[row] = layer
        return PrefillResult(merge_rows(parts, batch, groups[0][1].signature), exits if branched else None)

    # -- running -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, **images) -> PrunedOutput:
        """The pruned prefill; images: the family's other processor outputs (e.g. image_grid_thw)."""
        prepared = self.prepare(input_ids, pixel_values, attention_mask, **images)
        result = self.prefill(prepared)
        v = result.values
        return PrunedOutput(v["logits"], v["positions"], v["visual"], result.exit_layers, v)

    def generation_config(self, **overrides) -> GenerationConfig:
        """Generation settings: the model's defaults (eos/pad from its generation_config) under `overrides`."""
        defaults = self.frontend.generation
        eos = overrides.pop("eos_token_id", None)
        eos = defaults.get("eos_token_id") if eos is None else eos
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),))
        pad = overrides.pop("pad_token_id", None)
        pad = defaults.get("pad_token_id") if pad is None else pad
        pad = pad if pad is not None else (eos[0] if eos else 0)
        return GenerationConfig(eos_token_id=eos, pad_token_id=int(pad), **overrides)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, eos_token_id=None,
                 pad_token_id: int | None = None, streamer=None, generator: torch.Generator | None = None,
                 **images) -> torch.Tensor:
        """Tokens [B, S + n] like transformers' generate: the prompt, then up to max_new_tokens new tokens per row
        (rows that ended are padded with pad_token_id). Prefill is the pruned program; each new token runs the
        compiled decode step over the per-layer caches (runtime/generate.py). `cm.last_generation` holds the
        timings and cache sizes of the call; compiling or loading stages (a first call) is kept out of the timings and
        given apart (compile_seconds, load_seconds). images: the family's other processor outputs (e.g. Qwen2-VL's
        image_grid_thw), so `cm.generate(**processor(images=..., text=..., return_tensors="pt"))` works."""
        config = self.generation_config(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                        top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                                        pad_token_id=pad_token_id)
        self._check_context(input_ids, max_new_tokens)
        setup0 = self.setup_seconds()
        t0 = time.perf_counter()
        prepared = self.prepare(input_ids, pixel_values, attention_mask, **images)  # vision + merge: part of TTFT
        t_prepare = time.perf_counter() - t0
        groups = self.row_groups(prepared)  # a program for a new visual-token count is built and lowered here
        exe = groups[0][1]
        step = exe.step_stage()  # token selection is undone in the step: one step serves every count's caches
        step.lower()  # the decode step compiled (or loaded from the artifact) before the clock starts
        prefill_stages = [s for _, e in groups for s in e.prefill_stages()]
        prefill0, step0 = _setup(prefill_stages), _setup([step])
        stats = GenerationStats()
        out = generate(self.prefill, step, self.frontend.embed_tokens, prepared, config, streamer=streamer,
                       generator=generator, stats=stats, signature=exe.signature, pool=self.cache_pool)
        # Stages of a program with branches are lowered at their first call, inside prefill; a JIT decode step
        # compiles inside its first call: neither is run time.
        stats.ttft_seconds += t_prepare - (_setup(prefill_stages) - prefill0)
        stats.decode_seconds -= _setup([step]) - step0
        compiled, loaded = (a - b for a, b in zip(self.setup_seconds(), setup0))
        stats.compile_seconds, stats.load_seconds = compiled, loaded
        if compiled > 0.05:
            log.info("generate: compiled in %.1f s (not in its timings)", compiled)
        self.last_generation = stats
        return out

    def _check_context(self, input_ids, max_new_tokens: int) -> None:
        """The prompt and the new tokens fit the model's positions (the message gives the limit that applies)."""
        context = getattr(self.frontend.config.text_config, "max_position_embeddings", None)
        n = input_ids.shape[-1] if isinstance(input_ids, torch.Tensor) and input_ids.dim() else None
        if context is None or n is None or n + max_new_tokens <= context:
            return
        if n >= context:
            raise InputError(f"the prompt alone has {n} tokens; the model's context holds {context} positions for the "
                             f"prompt and the new tokens together. Shorten the prompt to at most {context - 1} tokens "
                             "(fewer words, or a smaller image count)")
        raise InputError(f"the prompt ({n} tokens) plus max_new_tokens={max_new_tokens} exceeds the model's context "
                         f"of {context} positions; ask for at most {context - n} new tokens")

    def setup_seconds(self) -> tuple[float, float]:
        """(compile, load) seconds spent so far on every program's stages: what timings of runs leave out."""
        totals = [e.setup_seconds() for e in self.executables.values()]
        return sum(c for c, _ in totals), sum(lo for _, lo in totals)

    # -- artifacts ---------------------------------------------------------------------------------
    def manifest(self) -> dict:
        """What an artifact of this model records about it (artifacts.write_artifact adds the files)."""
        if self._manifest is not None:
            return self._manifest
        import transformers

        geometry = self.frontend.geometry
        return {
            "versions": {"vtcompile": __version__, "torch": torch.__version__,
                         "transformers": transformers.__version__},
            "model": self.spec.to_dict(),
            "geometry": geometry.to_dict(),
            "config_hash": geometry.config_hash(),
            "passes": [{"pass": p.name, "config": c.to_dict()} for p, c in self.passes],
            "target": self.target.name,
            "generate": self.report.decode,
            "generation": dict(self.frontend.generation),
            "input_spec": {"inputs": ["input_ids [B,S] int64", "pixel_values (the processor's)",
                                      "attention_mask [B,S] (left padding)", *self.frontend.image_inputs],
                           "visual_tokens_per_image": geometry.visual_tokens_per_image,
                           "image_token_id": self.frontend.image_token_id},
            "report": self.report.to_dict(),
        }

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        """Write the artifact directory atomically (temporary directory moved into place); see vtcompile.artifacts.
        With force, replaces an existing artifact, never a directory that is not one."""
        from .artifacts import copy_artifact, write_artifact

        if self.source is not None:
            return copy_artifact(self.source, out_dir, force=force)
        return write_artifact(self, out_dir, force=force)
