"""Progress of long stages, always on stderr so stdout stays clean for ``--json``.

On a terminal a live tqdm bar; when stderr is a file or a CI log (not a TTY), a plain line
every `LOG_SECONDS` instead, since a bar redrawn with carriage returns makes one endless
line in a log. Stages take ``progress=False`` (the CLI's ``--quiet``) to silence it.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

from tqdm import tqdm

LOG_SECONDS = 30.0
_CURSOR = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class _Lines:
    """A stream for tqdm that turns its in-place redraws into whole lines (cursor moves dropped)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> None:
        for line in _CURSOR.sub("", text).replace("\r", "\n").split("\n"):
            if line.strip():
                self.stream.write(line.rstrip() + "\n")

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*args: Any, **kwargs: Any) -> tqdm:
    """A tqdm bar (same arguments) on stderr: live on a terminal, a line every `LOG_SECONDS` in a log."""
    stream = sys.stderr
    if not stream.isatty():
        kwargs = {"mininterval": LOG_SECONDS, "maxinterval": LOG_SECONDS, "ascii": True, **kwargs, "file": _Lines(stream)}
    return tqdm(*args, **kwargs)
