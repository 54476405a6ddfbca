"""Model loading: presets by name, local checkpoint directories, random-weight geometries.

No network access is ever attempted: a preset without local weights is a clear error that names the
places looked at and the two ways out (``--weights DIR`` or ``--random-weights``).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ModelNotFoundError, UnsupportedModelError, VtcompileError
from .family import Family, Frontend
from .llava import LlavaFamily, ModelSpec
from .presets import PRESETS, Preset
from .qwen2_vl import Qwen2VLFamily

DEFAULT_MODEL = "testbed"
FAMILIES: tuple[type[Family], ...] = (LlavaFamily, Qwen2VLFamily)

__all__ = ["DEFAULT_MODEL", "FAMILIES", "Family", "Frontend", "ModelSpec", "adapt", "family_of_config",
           "known_models", "load_model", "model_config", "resolve_spec", "build_from_spec"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def known_models() -> list[tuple[str, str]]:
    """(name, description) of every preset."""
    return [(p.name, p.description) for p in PRESETS.values()]


def _supported() -> str:
    return ", ".join(f"{c} ({f.name})" for f in FAMILIES for c in f.model_classes)


def adapt(model, spec: ModelSpec, processor=None) -> Family:
    """The family adapter of a live transformers model; a clear error for a model no family wraps."""
    for family in FAMILIES:
        if family.accepts(model):
            return family(model, spec, processor)
    raise UnsupportedModelError(f"vtcompile has no model family for {type(model).__name__}; supported: "
                                f"{_supported()}")


def family_of_config(config) -> type[Family]:
    """The family whose models have this config class (a checkpoint's or an artifact's config.json)."""
    name = type(config).__name__
    for family in FAMILIES:
        if name in family.config_classes:
            return family
    raise UnsupportedModelError(f"the checkpoint holds a {name}; vtcompile's model families take "
                                f"{', '.join(c for f in FAMILIES for c in f.config_classes)}")


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path.home() / ".cache" / "huggingface" / "hub")
    return list(dict.fromkeys(dirs))


def _find_in_cache(repo: str) -> tuple[Path | None, list[Path]]:
    looked = []
    for cache in _hf_cache_dirs():
        snaps = cache / ("models--" + repo.replace("/", "--")) / "snapshots"
        looked.append(snaps)
        if snaps.is_dir():
            for snap in sorted(snaps.iterdir(), reverse=True):
                if (snap / "config.json").is_file():
                    return snap, looked
    return None, looked


def _checkpoint_dir(path: Path) -> Path:
    """A checkpoint directory that holds a config.json (checked before anything is loaded)."""
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"checkpoint directory {path} has no config.json; expected a transformers checkpoint directory "
            f"(config.json + *.safetensors) of a supported family: {_supported()}"
        )
    return path


def _check_dtype(dtype: str) -> str:
    if dtype not in _DTYPES:
        raise VtcompileError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")
    return dtype


def resolve_spec(name: str = DEFAULT_MODEL, weights: str | None = None, random_weights: bool = False,
                 layers: int | None = None, dtype: str | None = None, seed: int = 0) -> ModelSpec:
    """Decide where a model comes from, without loading any weights."""
    if layers is not None and layers < 1:
        raise VtcompileError(f"--layers must be >= 1, found {layers}")
    if weights is not None and random_weights:
        raise VtcompileError("--weights and --random-weights exclude each other; pass one of them")
    preset = PRESETS.get(name)
    if preset is None:
        path = Path(weights or name)
        if weights is None and not path.is_dir():
            raise ModelNotFoundError(
                f"unknown model {name!r}. Known models: {', '.join(PRESETS)}; or pass a local checkpoint "
                "directory (one holding config.json and the weights)."
            )
        return ModelSpec(name=str(path), source="checkpoint", path=str(_checkpoint_dir(path)), layers=layers,
                         dtype=_check_dtype(dtype or "float32"))
    dtype = _check_dtype(dtype or preset.default_dtype)
    if preset.shipped:
        from ..testbed import CheckpointMissingError, checkpoint_dir

        if random_weights or weights is not None:
            raise VtcompileError(f"model {name!r} is the shipped checkpoint; --weights/--random-weights do not apply")
        try:
            path = checkpoint_dir()
        except CheckpointMissingError as exc:
            raise ModelNotFoundError(str(exc)) from None
        return ModelSpec(name=name, source="checkpoint", path=str(path), layers=layers, dtype=dtype)
    if preset.random_only:
        if weights is not None:
            raise VtcompileError(f"model {name!r} exists only with random weights; --weights does not apply")
        return ModelSpec(name=name, source="random", seed=seed, layers=layers, dtype=dtype)
    if random_weights:
        return ModelSpec(name=name, source="random", seed=seed, layers=layers, dtype=dtype)
    if weights is not None:
        return ModelSpec(name=name, source="checkpoint", path=str(_checkpoint_dir(Path(weights))), layers=layers,
                         dtype=dtype)
    found, looked = _find_in_cache(preset.hf_repo)
    if found is None:
        where = "\n  ".join(str(p) for p in looked)
        raise ModelNotFoundError(
            f"no local weights for {name!r} ({preset.hf_repo}). Looked in the Hugging Face cache:\n  {where}\n"
            "vtcompile never downloads. Either pass a local checkpoint directory with --weights DIR, or use "
            "--random-weights to build the real geometry with random weights (for speed and FLOPs work)."
        )
    return ModelSpec(name=name, source="checkpoint", path=str(found), layers=layers, dtype=dtype)


def _preset_config(preset: Preset):
    import transformers

    if preset.family in ("qwen2-vl", "qwen2.5-vl"):
        config_class = transformers.Qwen2VLConfig if preset.family == "qwen2-vl" else transformers.Qwen2_5_VLConfig
        text = dict(preset.text, **{k: v for k, v in preset.llava.items() if k != "tie_word_embeddings"})
        return config_class(vision_config=dict(preset.vision), text_config=text, **preset.llava)
    text = dict(preset.text)
    text_config = transformers.CONFIG_MAPPING[text.pop("model_type", "llama")](**text)
    return transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(**preset.vision),
                                    text_config=text_config, **preset.llava)


def model_config(spec: ModelSpec):
    """The model's config (LlavaConfig, Qwen2VLConfig, ...) of a spec, with the --layers override applied (no weights
    loaded)."""
    if spec.source == "random":
        config = _preset_config(PRESETS[spec.name])
    else:
        from transformers import AutoConfig

        path = _checkpoint_dir(Path(spec.path))
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        family_of_config(config)  # refuses a checkpoint no family takes before any weight is read
    if spec.layers is not None:
        if spec.layers > config.text_config.num_hidden_layers:
            raise VtcompileError(f"--layers {spec.layers} exceeds the model's "
                                 f"{config.text_config.num_hidden_layers} decoder layers")
        config.text_config.num_hidden_layers = spec.layers
    config.text_config._attn_implementation = "sdpa"
    config.vision_config._attn_implementation = "sdpa"
    config._attn_implementation = "sdpa"
    return config


def build_from_spec(spec: ModelSpec, device: str | torch.device | None = None) -> Family:
    """Load (or build, for random weights) the model a spec names, on `device` (default: the CPU).

    Random weights are drawn on the device itself (a 7B model initialises in seconds on a GPU, minutes on
    a CPU); the values depend on the device's random generator, so compare random-weight runs on one device.
    """
    import transformers

    config = model_config(spec)
    model_class = getattr(transformers, family_of_config(config).model_class_name(config))
    dtype = _DTYPES[spec.dtype]
    device = torch.device(device or "cpu")
    if spec.source == "random":
        torch.manual_seed(spec.seed)
        with device:
            model = model_class(config).to(dtype)
        processor = None
    else:
        model = model_class.from_pretrained(
            spec.path, config=config, dtype=dtype, local_files_only=True, attn_implementation="sdpa").to(device)
        processor = _load_processor(spec.path)
    return adapt(model.eval(), spec, processor)


def _load_processor(path: str):
    try:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception:  # noqa: BLE001 - a checkpoint without processor files is usable with input_ids
        return None


def load_model(name: str = DEFAULT_MODEL, weights: str | None = None, random_weights: bool = False,
               layers: int | None = None, dtype: str | None = None, seed: int = 0,
               device: str | torch.device | None = None) -> Family:
    """Resolve and load a model on `device` (default: the CPU); see :func:`resolve_spec` for the rules."""
    return build_from_spec(resolve_spec(name, weights, random_weights, layers, dtype, seed), device)


def geometry_of(spec: ModelSpec):
    """Geometry of a spec without building the model (works for 7B/13B on any machine)."""
    config = model_config(spec)
    return family_of_config(config).geometry_of(config)
