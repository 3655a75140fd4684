"""Files every stage writes: atomically (a killed job leaves the old file or the new one,
never half of one), and JSON read back with errors that name the file and the line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from spdy.errors import InputError


TMP_SUFFIX = ".tmp"


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write`` a temporary file beside ``path``, then rename it over ``path``; an interrupted
    write leaves no temporary file (a SIGKILL can: see `remove_temporaries`)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def remove_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed `replace_atomically` left under ``directory``: nothing
    reads them, and a rerun would only overwrite them one by one."""
    stale = [p for p in Path(directory).rglob(f"*{TMP_SUFFIX}") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(json.dumps(data, indent=indent)))


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parsed JSON; ``FileNotFoundError`` or `InputError` naming ``what``, the path and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{what} {path}: line {e.lineno}: invalid JSON ({e.msg}); the file may be truncated") from None


def digest(*parts: Any, length: int = 10) -> str:
    """A short stable hash of JSON-able parts, for cache file names and checkpoint keys."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:length]
