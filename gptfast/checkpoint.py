"""Atomic, validated checkpoints.

``save_checkpoint`` writes to a temporary file in the destination folder, flushes and fsyncs it and
then ``os.replace``s it over the destination, so the destination is always either the previous good
checkpoint or the complete new one, never a half-written file; on any failure the temporary file is
removed. ``load_checkpoint`` turns every way a file can be unreadable into a ``CheckpointError``
naming the path.

The payload holds only tensors and plain Python containers/scalars, so it loads with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Dict, Union

import torch

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "CheckpointError", "atomic_write", "save_checkpoint",
           "load_checkpoint"]

FORMAT_NAME = "gptfast"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a gptfast checkpoint."""


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Union[str, os.PathLike], write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it and ``os.replace`` it over
    ``path``: ``path`` is always the old file or the complete new one. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path: Union[str, os.PathLike], state: Dict[str, Any]) -> Path:
    """Atomically write ``state`` (plus format name/version) to ``path``; returns the path."""
    payload = dict(state)
    payload["format"] = FORMAT_NAME
    payload["format_version"] = FORMAT_VERSION
    return atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Union[str, os.PathLike], map_location: Any = "cpu") -> Dict[str, Any]:
    """Load and validate a checkpoint written by :func:`save_checkpoint`.

    Raises ``FileNotFoundError`` for a missing path and ``CheckpointError`` (naming the path) for a
    truncated, corrupt, foreign or too-new file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, not a gptfast checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (truncated checkpoint?)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # zipfile/pickle/EOF/RuntimeError ... all mean "unreadable"
        msg = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
        raise CheckpointError(
            f"{path}: corrupt or truncated file, or not a gptfast checkpoint "
            f"({type(e).__name__}{': ' + msg[:200] if msg else ''})"
        ) from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: not a gptfast checkpoint (no '{FORMAT_NAME}' format marker)")
    version = obj.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {version!r} is not supported "
            f"(this gptfast reads versions <= {FORMAT_VERSION})"
        )
    return obj
