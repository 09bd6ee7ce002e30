"""Loading an offer catalog file (JSON or YAML) into the offers table.

Every offer of the file is checked by the same strict model as `PUT /admin/offers/{offerId}` before
anything is written: one invalid offer and nothing of the file is stored, so a catalog is never left
half-loaded. Writes go through `logic.catalog.put_offer`, the function the admin route calls.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from user_credits.api.schemas import OfferIn
from user_credits.domain.offers import Offer
from user_credits.logic import catalog


class CatalogFileError(Exception):
    """The file cannot be loaded; `problems` names each bad offer by its id (or position)."""

    def __init__(self, path: Path, problems: Sequence[str]) -> None:
        self.path = path
        self.problems = list(problems)
        super().__init__(f"{path}: nothing loaded, {len(self.problems)} problem(s):\n  " + "\n  ".join(self.problems))


@dataclass
class LoadResult:
    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)


def _entries(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise CatalogFileError(path, [f"not valid {path.suffix.lstrip('.') or 'YAML'}: {exc}"]) from exc
    if isinstance(data, dict) and set(data) == {"offers"}:
        data = data["offers"]
    if not isinstance(data, list):
        raise CatalogFileError(path, ['expected a list of offers, or {"offers": [...]}'])
    return data


def _describe(error: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'offer'}: {e['msg']}" for e in error.errors()[:5]
    )


def read_catalog(path: Path) -> list[Offer]:
    """The offers of a catalog file, all valid, or CatalogFileError listing every problem."""
    problems: list[str] = []
    offers: list[Offer] = []
    seen: set[str] = set()
    for position, entry in enumerate(_entries(path), start=1):
        offer_id = entry.get("offerId") if isinstance(entry, dict) else None
        label = offer_id if isinstance(offer_id, str) and offer_id else f"offer #{position}"
        if not isinstance(entry, dict):
            problems.append(f"{label}: an offer must be a mapping")
            continue
        if not isinstance(offer_id, str) or not offer_id:
            problems.append(f"{label}: offerId is required in a catalog file")
            continue
        if offer_id in seen:
            problems.append(f"{label}: appears twice")
            continue
        seen.add(offer_id)
        try:
            model = OfferIn.model_validate(entry)
        except ValidationError as exc:
            problems.append(f"{label}: {_describe(exc)}")
            continue
        offers.append(Offer.from_json({**model.model_dump(), "offerId": offer_id}))
    if problems:
        raise CatalogFileError(path, problems)
    return offers


def load_catalog_file(path: Path) -> LoadResult:
    """Validate the whole file, then create or replace each offer (tables must be bound)."""
    result = LoadResult()
    for offer in read_catalog(path):
        (result.created if catalog.put_offer(offer) else result.updated).append(offer.offer_id)
    return result
