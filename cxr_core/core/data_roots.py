"""Which folders the server may read datasets and weights files from (issue 15, data roots).

Without a restriction anyone who reaches the app could index ``/`` or ``/home`` and have its
images hashed and served back as thumbnails. The roots come from the environment:

``CXR_DATA_ROOTS``  folders (os.pathsep-separated) that datasets and weights files may lie
                    under; when set it wins in every mode.
otherwise, with sign-in on (``CXR_AUTH_MODE=oidc``, set by the app when ``[auth]`` is
configured) or when the database is shared (``CXR_DB_URL`` is not a local SQLite file: every
worker and CLI on every host then reads what any signed-in user queued, issue 26 item 7):
the paths in ``CXR_DATA_DIR`` and nothing else;
otherwise (single-user local mode on a local SQLite file): no restriction (``None``).

The repository's own ``demo/`` folder is always allowed when roots are restricted.

Every check resolves the real path (``os.path.realpath``), so a symlink inside a root that
points out of it is refused like the path it points to.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cxr_core.core.errors import PathNotAllowed

__all__ = ["allowed_roots", "check_path", "check_weights", "describe", "is_within",
           "shared_database", "weights_roots"]

UNSET = object()  # check_path(roots=...) default: read the environment


def _paths(raw: str) -> tuple[Path, ...]:
    return tuple(Path(os.path.realpath(Path(p.strip()).expanduser()))
                 for p in raw.split(os.pathsep) if p.strip())


DEMO_DIR = Path(__file__).resolve().parents[2] / "demo"  # the repository's embedded films


def allowed_roots() -> tuple[Path, ...] | None:
    """The configured data roots (real paths), or None when any path is allowed.

    Returns:
        ``CXR_DATA_ROOTS`` when set; else, with sign-in on or a shared database, the
        ``CXR_DATA_DIR`` paths (possibly none); else None (local mode, unrestricted).
        Restricted roots always include the repository's own ``demo/`` folder.
    """
    raw = os.environ.get("CXR_DATA_ROOTS", "")
    if raw.strip():
        return _paths(raw) + (_real(DEMO_DIR),)
    if os.environ.get("CXR_AUTH_MODE", "").strip().lower() == "oidc" or shared_database():
        return _paths(os.environ.get("CXR_DATA_DIR", "")) + (_real(DEMO_DIR),)
    return None


def shared_database() -> bool:
    """Whether ``CXR_DB_URL`` names a database other than a local SQLite file (PostgreSQL,
    ...): jobs in it may come from any signed-in user on any host, so workers and the CLI
    restrict the data roots even without sign-in configured here."""
    url = os.environ.get("CXR_DB_URL", "").strip()
    return bool(url) and not url.startswith("sqlite")


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def is_within(path: str | Path, root: str | Path) -> bool:
    """Whether the real path of ``path`` is ``root`` (real path) or lies under it."""
    real = Path(os.path.realpath(Path(path).expanduser()))
    base = Path(os.path.realpath(Path(root).expanduser()))
    return real == base or base in real.parents


def describe(roots: Sequence[Path] | None) -> str:
    """The roots as a person reads them (the add-dataset form, error messages)."""
    if roots is None:
        return "any folder (local mode: no data roots configured)"
    why = "the database is shared" if shared_database() and os.environ.get(
        "CXR_AUTH_MODE", "").strip().lower() != "oidc" else "sign-in is on"
    if not roots:
        return (f"no folder ({why} and neither CXR_DATA_ROOTS nor CXR_DATA_DIR is set)")
    if list(roots) == [_real(DEMO_DIR)]:
        return (f"only the embedded demo films ({DEMO_DIR}): {why} and neither "
                "CXR_DATA_ROOTS nor CXR_DATA_DIR is set")
    return ", ".join(str(r) for r in roots)


def check_path(path: str | Path, roots: Sequence[Path] | None | object = UNSET,
               what: str = "dataset folder") -> Path:
    """The real path of ``path`` if it lies under one of ``roots``.

    Args:
        path: what the user asked for (``~`` expanded).
        roots: allowed roots; None allows any path; default :func:`allowed_roots`.
        what: what the path is, for the message ("dataset folder", "weights file").

    Returns:
        The resolved real path (symlinks followed).

    Raises:
        PathNotAllowed: the real path is outside every root (also when a symlink leads out).
    """
    if roots is UNSET:
        roots = allowed_roots()
    real = Path(os.path.realpath(Path(path).expanduser()))
    if roots is None or any(is_within(real, r) for r in roots):  # type: ignore[union-attr]
        return real
    via = f" (it resolves to {real})" if str(real) != str(Path(path).expanduser()) else ""
    raise PathNotAllowed(
        f"{what} {str(path)!r} is outside the allowed data roots{via}. Allowed: "
        f"{describe(roots)}. Ask an administrator to add its folder to CXR_DATA_ROOTS.")


def weights_roots(roots: Sequence[Path] | None, *, home: Path | None = None,
                  repo_models: Path | None = None) -> tuple[Path, ...] | None:
    """Where a weights file may lie: the data roots plus the repo's ``models/`` and CXR_HOME
    (run checkpoints, exported models); None when the data roots are unrestricted."""
    if roots is None:
        return None
    if home is None:
        from cxr_core.core.settings import get_settings

        s = get_settings()
        extra = [s.home, s.artifacts_root]
    else:
        extra = [home]
    repo_models = repo_models or Path(__file__).resolve().parents[2] / "models"
    return tuple(roots) + tuple(Path(os.path.realpath(p)) for p in (*extra, repo_models))


def check_weights(weights: str | None) -> Path | None:
    """Check a TrainConfig ``weights`` value that names a file (not None, "imagenet", "run:ID").

    Returns:
        The file's real path, or None when ``weights`` names no file.

    Raises:
        PathNotAllowed: roots are restricted and the file lies under none of them, nor under
            the repo's ``models/``, CXR_HOME or CXR_ARTIFACTS.
    """
    if not weights or weights == "imagenet" or weights.startswith("run:"):
        return None
    return check_path(weights, roots=weights_roots(allowed_roots()), what="weights file")
