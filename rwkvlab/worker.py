"""Reading a benchmark worker's stderr: progress bars apart from what a person should read.

A worker (``rwkvlab bench --json`` in a subprocess, run by the panel in ``lab.py`` and by
``sweep.py``) draws tqdm bars on its stderr. tqdm redraws a bar after a ``\\r``, moves between
nested bars with ANSI cursor escapes (``ESC[A``), and never ends a bar's line, so a warning
printed while a bar is open lands right after the bar's text and an escape code. A worker killed
mid-run leaves only such redraws at the end. Both runners cut stderr into pieces here, so the
line that says why a worker failed is the last thing it wrote for a person, never a bar
fragment or a raw escape code.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

# Where one piece of terminal output ends: a newline, a carriage return (a redraw from the start
# of the line), or an escape sequence (a cursor move: what follows is drawn somewhere else).
# Escapes are CSI sequences (ESC [ parameters final-byte) and the two-byte ESC @..Z \ ^ _ ones;
# "ESC [" and "ESC ]" alone are left whole so a sequence cut by a read still joins its rest.
_BREAK = re.compile(r"\r|\n|\x1b(?:\[[0-?]*[ -/]*[@-~]|[@-Z\\^_])")
# What is left once the pieces are cut: the start of a sequence the worker never finished (it was
# killed mid-write), a lone ESC, a bell or another control byte.
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*|[\x00-\x08\x0b-\x1f\x7f]")
# One state of a tqdm bar with a known total: "desc:  40%|████      | 4/10 [...]".
TQDM_BAR = re.compile(r"^\s*(?P<desc>[^\r\n]*?):\s+\d+%\|[^|]*\|\s*(?P<n>\d+)/(?P<total>\d+)")
BENCH_ERROR = "rwkvlab bench:"  # how bench starts the line that says what to change


def split_pieces(text: str) -> list[str]:
    """``text`` cut at newlines, carriage returns and escape sequences. When reading a stream,
    the last piece may be unfinished: keep it and prepend it to the next read."""
    return _BREAK.split(text)


def clean(piece: str) -> str:
    """One piece without leftover control bytes or surrounding blanks ("" for a bar's erasure)."""
    return _CONTROL.sub("", piece).strip()


def human(piece: str) -> str:
    """One piece as a line for a person: cleaned, or "" when blank or a state of a bar."""
    piece = clean(piece)
    return "" if TQDM_BAR.match(piece) else piece


def last_words(lines: Sequence[str]) -> str:
    """Why a worker failed: bench's own error line (it says what to change; a multi-line cause
    such as a shader diagnostic follows it), else the last line (a traceback's exception, a
    driver's message), else ``"no message"``."""
    own = [line for line in lines if line.startswith(BENCH_ERROR)]
    return own[-1] if own else lines[-1] if lines else "no message"
