"""SPEC 2.1: how long a purchase lasts. Calendar arithmetic in UTC; month ends are clamped."""

from __future__ import annotations

import calendar
from datetime import datetime, timedelta
from typing import Final

CYCLES: Final = ("once", "daily", "weekly", "bi-weekly", "monthly", "trimester", "semester", "yearly", "custom")

_DAYS: Final = {"daily": 1, "weekly": 7, "bi-weekly": 14}
_MONTHS: Final = {"monthly": 1, "trimester": 3, "semester": 6, "yearly": 12}


def add_months(moment: datetime, months: int) -> datetime:
    """Jan 31 + 1 month = the last day of February (the day is clamped, never rolled over)."""
    index = moment.month - 1 + months
    year, month = moment.year + index // 12, index % 12 + 1
    day = min(moment.day, calendar.monthrange(year, month)[1])
    return moment.replace(year=year, month=month, day=day)


def cycle_end(start: datetime, cycle: str, quantity: int, custom_cycle_seconds: int | None = None) -> datetime | None:
    """When `quantity` cycles bought at `start` run out; None for `once` (never)."""
    if cycle == "once":
        return None
    if cycle in _DAYS:
        return start + timedelta(days=_DAYS[cycle] * quantity)
    if cycle in _MONTHS:
        # Months are added in one step so that Jan 31 + 2 months is Mar 31, not Mar 28.
        return add_months(start, _MONTHS[cycle] * quantity)
    if cycle == "custom":
        if custom_cycle_seconds is None or custom_cycle_seconds <= 0:
            raise ValueError("a custom cycle needs customCycleSeconds > 0")
        return start + timedelta(seconds=custom_cycle_seconds * quantity)
    raise ValueError(f"unknown cycle {cycle!r}")


def later_expiry(a: datetime | None, b: datetime | None) -> datetime | None:
    """The later of two expiries where None means never (so None always wins)."""
    if a is None or b is None:
        return None
    return max(a, b)


# SPEC 2.10: a recurring offer's cycle as Stripe's `recurring.interval` and `interval_count`.
_STRIPE_INTERVALS: Final = {
    "daily": ("day", 1), "weekly": ("week", 1), "bi-weekly": ("week", 2), "monthly": ("month", 1),
    "trimester": ("month", 3), "semester": ("month", 6), "yearly": ("year", 1),
}


def stripe_interval(cycle: str) -> tuple[str, int]:
    """(interval, interval_count) of a cycle that can recur (not `once` nor `custom`)."""
    if cycle not in _STRIPE_INTERVALS:
        raise ValueError(f"a {cycle!r} cycle does not recur")
    return _STRIPE_INTERVALS[cycle]
