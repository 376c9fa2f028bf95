"""Where chat output goes: replies to stdout, everything else to the terminal or to stderr.

Owns the output rule that makes the non-interactive mode scriptable: when stdin is not a terminal,
stdout carries only replies (one line each, or one JSON object each) and every other line
(start-up, command output, notices, errors) goes to stderr. Dim text is used only on a colour
terminal (not with NO_COLOR or TERM=dumb).
"""

from __future__ import annotations

import os
import sys
from typing import TextIO


class Console:
    def __init__(self, interactive: bool, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.interactive = interactive
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.color = (self.out.isatty() and "NO_COLOR" not in os.environ
                      and os.environ.get("TERM", "") not in ("", "dumb"))

    @property
    def side(self) -> TextIO:
        """Where non-reply lines go."""
        return self.out if self.interactive else self.err

    def dim(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.color else text

    def info(self, text: str) -> None:
        print(text, file=self.side, flush=True)

    def notice(self, text: str) -> None:
        print(self.dim(text) if self.side is self.out else text, file=self.side, flush=True)

    def error(self, text: str) -> None:
        print(f"error: {text}", file=self.err if not self.interactive else self.out, flush=True)

    def write(self, text: str) -> None:
        """Reply text (stdout), unbuffered so it streams."""
        self.out.write(text)
        self.out.flush()
