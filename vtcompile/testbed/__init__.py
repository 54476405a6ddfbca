"""The testbed: a tiny LLaVA trained on synthetic scenes, shipped as package data.

- ``scenes``: deterministic scene + question generator, JSONL splits.
- ``build``: geometry, tokenizer/processor construction, save/load.
- ``train``: ``python -m vtcompile.testbed.train --out DIR`` trains it from scratch on CPU (a small package).
- ``evaluate``: whole generated answers through transformers' own ``generate`` (``evaluate_generated``).
- ``checkpoint_dir()``: the shipped checkpoint directory.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CheckpointMissingError", "checkpoint_dir", "load"]

_CHECKPOINT = Path(__file__).resolve().parent / "checkpoint"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "processor_config.json")


class CheckpointMissingError(FileNotFoundError):
    """The shipped testbed checkpoint is not where the package expects it."""


def checkpoint_dir() -> Path:
    """Directory of the shipped testbed checkpoint (loadable with ``from_pretrained``)."""
    missing = [f for f in _REQUIRED if not (_CHECKPOINT / f).is_file()]
    if missing:
        raise CheckpointMissingError(
            f"the testbed checkpoint is missing or incomplete: looked for {', '.join(missing)} in {_CHECKPOINT}. "
            "It ships as package data with vtcompile; reinstall the package, or rebuild it with "
            f"`python -m vtcompile.testbed.train --out {_CHECKPOINT}`."
        )
    return _CHECKPOINT


def load(path=None, attn_implementation: str = "sdpa"):
    """(model, processor) of the testbed, fp32, eval mode. ``path`` defaults to ``checkpoint_dir()``."""
    from .build import load as _load

    return _load(path, attn_implementation=attn_implementation)
