"""Python entry points: compile_pruned() and load_compiled(). Both return the one CompiledModel type."""
from __future__ import annotations

import os

import torch

from .compiled import DEFAULT_TEXT_TOKENS, CompiledModel, PrunedOutput
from .errors import VtcompileError
from .models import DEFAULT_MODEL, Family, ModelSpec, adapt, load_model
from .passes import PassConfig, resolve_passes
from .report import Report
from .targets import get_target


def _as_adapter(model) -> Family:
    if isinstance(model, Family):
        return model
    if isinstance(model, str):
        return load_model(model)
    if isinstance(model, torch.nn.Module):
        name = getattr(model.config, "name_or_path", "") or "in-memory model"
        return adapt(model, ModelSpec(name=name, source="in-memory", dtype=str(
            next(model.parameters()).dtype).replace("torch.", "")))
    raise VtcompileError(f"compile_pruned expects a model name, a transformers model of a supported family "
                         f"(LlavaForConditionalGeneration) or a loaded adapter; found {type(model).__name__}")


def compile_pruned(model=DEFAULT_MODEL, passes=None, target: str = "eager", calibration=None,
                   text_tokens: int = DEFAULT_TEXT_TOKENS, recipes: dict | None = None,
                   progress: bool = True) -> CompiledModel:
    """Capture `model`, apply `passes` in order and lower to `target`.

    model: a preset name / checkpoint directory, a transformers model of a supported family
    (LlavaForConditionalGeneration with a Llama, Mistral, Qwen2 or Gemma backbone; Qwen2VLForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration), or an adapter from
    vtcompile.models.load_model. passes: a name ('NAME'), a spec ('NAME:field=value,...'; `vtcompile passes`), a config
    object, a (name, {field: value}) tuple, or a list of those. calibration: data for passes that calibrate
    (PassDef.calibrate): 'testbed', a JSONL file, a list of (input_ids, pixel_values, attention_mask), or
    'synthetic'; giving it when no pass calibrates is an error rather than silently ignored. recipes: {pass name:
    recipe} fitted earlier. text_tokens: the prompt length assumed by the report's true-FLOPs and KV columns.
    """
    resolved = resolve_passes(passes)
    if calibration is not None and not any(p.calibrate for p, _ in resolved):
        names = ", ".join(p.name for p, _ in resolved) or "no passes"
        raise VtcompileError(f"calibration data was given but {names} need(s) none; drop the argument")
    tgt = get_target(target)  # fail on an unavailable target before any capture work
    return CompiledModel.build(_as_adapter(model), resolved, tgt, text_tokens, calibration, recipes, progress)


def load_compiled(path: str | os.PathLike) -> CompiledModel:
    """Load an artifact written by CompiledModel.save, in any process, without the original model files.

    Refuses, with a message saying what to do, a format or vtcompile/torch version it does not read, a file
    whose sha256 does not match the manifest, and a config whose hash does not match."""
    return CompiledModel.load(path)


__all__ = ["CompiledModel", "PassConfig", "PrunedOutput", "Report", "compile_pruned", "load_compiled"]
