"""Errors a user can act on.

Every error vtcompile raises on bad input is a ``VtcompileError``: its message says what was expected,
what was found and what to do. The CLI prints the message (no traceback) and exits with ``exit_code``.
"""
from __future__ import annotations


class VtcompileError(Exception):
    """Base class for errors caused by input the user can fix."""

    exit_code = 2


class ModelNotFoundError(VtcompileError):
    """A model name or checkpoint that cannot be resolved locally."""


class InputError(VtcompileError):
    """Inputs (token ids, images, masks) that do not fit the model."""


class PassConfigError(VtcompileError):
    """A pass name, field or value that is not valid."""


class UnsupportedModelError(VtcompileError):
    """A pass or capture step that does not support the model's structure."""


class TargetUnavailableError(VtcompileError):
    """A backend whose runtime is missing on this machine."""


class ArtifactError(VtcompileError):
    """An artifact directory that is missing, corrupt or does not match."""


class PassFailedError(VtcompileError):
    """A pass raised or produced an invalid graph; names the pass and the ones applied before it."""

    exit_code = 3
