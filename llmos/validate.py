"""Checks of plain values at the boundaries, one place for the messages: every bad value is
refused with an InvalidRequestError that names the field, the rule and what was given."""

from __future__ import annotations

from llmos.errors import InvalidRequestError


def _range(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo:g}, {hi:g}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo:g}"
    return f" <= {hi:g}" if hi is not None else ""


def integer(name: str, value, lo: int | None = None, hi: int | None = None) -> int:
    """An int (never a bool) within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, int) or \
            (lo is not None and value < lo) or (hi is not None and value > hi):
        raise InvalidRequestError(f"{name}: must be an integer{_range(lo, hi, False)}, got {value!r}")
    return value


def number(name: str, value, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> float:
    """An int or float (never a bool) within [lo, hi], or (lo, hi] with lo_open."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or \
            (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        raise InvalidRequestError(f"{name}: must be a number{_range(lo, hi, lo_open)}, got {value!r}")
    return value
