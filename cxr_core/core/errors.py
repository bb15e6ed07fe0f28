"""One exception family for the whole package.

Every error a user can cause derives from :class:`CxrError`, so the CLI and the pages
can show its message (which says what was expected and what was received) without a traceback.
"""
from __future__ import annotations


class CxrError(Exception):
    """Base class of every expected, user-facing error."""


class ConfigError(CxrError, ValueError):
    """A configuration value is invalid."""


class DatasetError(CxrError):
    """A dataset path or layout cannot be used."""


class ImageLoadError(CxrError):
    """One image cannot be read; the rest of a batch goes on."""


class ModelError(CxrError):
    """A model cannot be built or its weights cannot be loaded."""


class RunError(CxrError):
    """A training run cannot be started, resumed or found."""


class PermissionDenied(CxrError, PermissionError):
    """The signed-in principal's roles do not allow this action (see :mod:`cxr_core.auth.policy`)."""


class QuotaExceeded(CxrError):
    """A per-user quota or a per-run limit from configuration would be exceeded."""


class PathNotAllowed(CxrError, PermissionError):
    """A path lies outside the configured data roots (or escapes one through a symlink)."""
