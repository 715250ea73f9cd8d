"""One way of writing each kind of number in the page, ``summary.md``, the terminal and the report's CSVs.

Accuracies, AP, error rates and shares: percent with one decimal (``66.6``); changes: points with a sign
(``+0.4 pts``); intervals: ``[low, high]`` in percent; thresholds, scores, weights and other real numbers: 4
significant digits. Column names say the unit (docs/results-format.md#units).
"""

from __future__ import annotations

import math

from ..results.bootstrap import Interval

SIGNIFICANT_DIGITS = 4
PERCENT_DECIMALS = 1


def percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal ('91.5'); '' for no value, 'nan' for NaN."""
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    return f"{round(100 * value, PERCENT_DECIMALS):.{PERCENT_DECIMALS}f}"


def points(change: float | None) -> str:
    """A change of fractions in percentage points with a sign ('+0.4 pts'); '' for none."""
    if change is None or math.isnan(change):
        return ""
    return f"{100 * change:+.{PERCENT_DECIMALS}f} pts"


def significant(value: float | None) -> str:
    """A real number with 4 significant digits ('0.5012', '1.385e-05'); '' for None, 'nan' for NaN."""
    if value is None:
        return ""
    if math.isnan(value):
        return "nan"
    return f"{value:.{SIGNIFICANT_DIGITS}g}"


def real(value: float | int) -> str:
    """A measured quantity: integers as they are, reals with 4 significant digits (from 1000 on, whole)."""
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return str(round(value)) if abs(value) >= 1000 else significant(value)


def interval_text(interval: Interval | None) -> str:
    """``[low, high]`` in percent; empty when not computed or undefined."""
    if interval is None or math.isnan(interval.low):
        return ""
    return f"[{percent(interval.low)}, {percent(interval.high)}]"


# ----------------------------------------------------------------------------- units in column names

PERCENT = "_pct"  # a column in percent (one decimal) ends in this
POINTS = "_pts"  # a change in percentage points ends in this
SIGNIFICANT_COLUMNS = frozenset(("brier", "fit_seconds", "weight"))  # with *_threshold: 4 significant digits


def is_significant_column(name: str) -> bool:
    """Thresholds, scores, times and weights: real numbers of their own unit, 4 significant digits."""
    return name.endswith("_threshold") or name in SIGNIFICANT_COLUMNS


def fraction_column(name: str, text: str) -> tuple[str, str]:
    """A fraction-valued column as the report writes it: (name with its unit, value in that unit).

    Thresholds, times and the Brier score keep their name with 4 significant digits; every other metric (an
    accuracy, AP, AUC, EER, ECE, rate, share or their interval bound) becomes percent with ``_pct``.
    """
    value = None if text == "" else float(text)
    if is_significant_column(name):
        return name, significant(value)
    return name + PERCENT, percent(value)
