"""What every ``mindspeed-cp`` subcommand shares: a parser whose errors are one line (exit status 2), argument
types that state their valid range, and the error a command raises for bad input found after parsing.

An argument is checked where it is parsed, so a bad value never reaches a computation::

    mindspeed-cp plan: argument --seq-length: must be an integer >= 1, got '0' (see mindspeed-cp plan --help)
"""

from __future__ import annotations

import argparse
import math
import os
from typing import Callable, Optional


class UsageError(Exception):
    """Bad input found after parsing: one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (status 2), like every other refusal."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _bounds(low, high, open_low: bool = False) -> str:
    first = f"> {low:g}" if open_low else f">= {low:g}"
    return first if high is None else f"{first} and <= {high:,}"


def integer(low: int = 1, high: Optional[int] = None) -> Callable[[str], int]:
    """argparse ``type``: an integer in ``[low, high]``; the error names the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {_bounds(low, high)}, got {text!r}")
        return value

    parse.__name__ = "integer"
    return parse


def real(low: float = 0.0, high: Optional[float] = None, open_low: bool = False) -> Callable[[str], float]:
    """argparse ``type``: a finite number ``>= low`` (``> low`` with ``open_low``) and ``<= high``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            value = math.nan
        if (
            not math.isfinite(value)
            or value < low
            or (open_low and value == low)
            or (high is not None and value > high)
        ):
            raise argparse.ArgumentTypeError(f"must be a number {_bounds(low, high, open_low)}, got {text!r}")
        return value

    parse.__name__ = "real"
    return parse


def output_file(text: str) -> str:
    """argparse ``type`` for a file to write: its folder must exist (checked before any work is done)."""
    folder = os.path.dirname(os.path.abspath(text))
    if not text or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name")
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text}: no folder {folder}")
    return text


def write_text(path: str, text: str, flag: str) -> None:
    """Write ``text`` to ``path``; an OSError becomes a :class:`UsageError` naming ``flag``."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise UsageError(f"cannot write {flag} {path}: {e.strerror}") from None
