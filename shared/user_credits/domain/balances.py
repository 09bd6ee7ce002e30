"""The low-balance rule (SPEC 2.7)."""

from __future__ import annotations


def crossed_below(threshold: int | None, before: int, after: int) -> bool:
    """SPEC 2.7: one CreditsLow per consumption that takes the balance from >= threshold to < threshold."""
    return threshold is not None and before >= threshold > after
