"""Loading a catalog file: the whole file is checked like PUT /admin/offers, then stored, or nothing is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml

from user_credits_dev.catalog_loader import CatalogFileError, load_catalog_file, read_catalog
from user_credits_dev.template import REPO_ROOT

EXAMPLE = REPO_ROOT / "catalog" / "example.yaml"


def _example_offers(suffix: str) -> list[dict[str, Any]]:
    """The example catalog with fresh ids, so this test's offers never meet another test's."""
    offers: list[dict[str, Any]] = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))["offers"]
    for offer in offers:
        offer["offerId"] += suffix
        if offer.get("overridingKey"):
            offer["overridingKey"] += suffix
        for item in offer.get("combinedItems", []):
            item["offerId"] += suffix
    return offers


def test_the_example_catalog_is_valid_and_shows_each_kind_of_offer() -> None:
    offers = {o.offer_id: o for o in read_catalog(EXAMPLE)}
    assert any(o.cycle == "once" and o.tokens > 0 for o in offers.values()), "a token pack"
    assert any(o.kind == "subscription" and o.cycle == "monthly" for o in offers.values()), "a subscription"
    assert any(o.unlocked_by and o.overriding_key for o in offers.values()), "an unlocked overriding offer"
    assert any(o.combined_items for o in offers.values()), "a bundle"
    assert any(set(o.prices.values()) == {0} for o in offers.values()), "a free offer"
    # Issue 13: a monthly plan with an allowance, a top-up that never expires in its group, a free trial
    # once per user (the README's walkthrough, step 8).
    plan = offers["pro-monthly"]
    assert (plan.billing, plan.cycle, plan.append_date) == ("recurring", "monthly", False) and plan.tokens > 0
    assert any(o.offer_group == plan.offer_group and o.billing == "one_time" and o.cycle == "once"
               for o in offers.values()), "a top-up in the plan's group"
    trial = offers["trial"]
    assert set(trial.prices.values()) == {0} and trial.per_user_limit == 1


def test_a_valid_file_loads_every_offer_and_a_reload_updates_them(service: Any, tmp_path: Path) -> None:
    suffix = f"-{uuid.uuid4().hex[:8]}"
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"offers": _example_offers(suffix)}), encoding="utf-8")

    first = load_catalog_file(path)
    again = load_catalog_file(path)

    expected = {o["offerId"] for o in _example_offers(suffix)}
    assert set(first.created) == expected and not first.updated
    assert set(again.updated) == expected and not again.created
    listed = service.call("GET", "/admin/offers", iam=True).body["offers"]
    stored = {o["offerId"]: o for o in listed if o["offerId"] in expected}
    assert stored.keys() == expected
    original = {o["offerId"]: o for o in _example_offers(suffix)}
    assert stored[f"tokens-250-pro{suffix}"]["unlockedBy"] == original[f"tokens-250-pro{suffix}"]["unlockedBy"]
    assert stored[f"trial{suffix}"]["prices"] == {"usd": 0, "eur": 0}


def test_an_invalid_offer_is_named_and_nothing_of_the_file_is_written(service: Any, tmp_path: Path) -> None:
    suffix = f"-{uuid.uuid4().hex[:8]}"
    offers = _example_offers(suffix)
    offers[2]["tokens"] = "2000"  # a string is not an integer (SPEC 3)
    offers[4]["cycle"] = "fortnightly"
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"offers": offers}), encoding="utf-8")
    before = service.item_count("OffersTable")

    with pytest.raises(CatalogFileError) as raised:
        load_catalog_file(path)

    problems = raised.value.problems
    assert len(problems) == 2
    assert problems[0].startswith(f"pro-monthly{suffix}: tokens")
    assert problems[1].startswith(f"expert-bundle{suffix}: cycle")
    assert service.item_count("OffersTable") == before


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("- {name: no id, offerGroup: g, tokens: 1, cycle: once, prices: {usd: 1}}", "offer #1: offerId is required"),
        ("- {offerId: a, offerGroup: g, tokens: 1, cycle: once, prices: {usd: 1}}\n"
         "- {offerId: a, offerGroup: g, tokens: 2, cycle: once, prices: {usd: 1}}", "a: appears twice"),
        ("- {offerId: a, offerGroup: g, tokens: 1, cycle: custom, prices: {usd: 1}}", "a: "),
        ("- {offerId: a, offerGroup: g, tokens: 1, cycle: once, prices: {}}", "a: prices"),
        ("offers: 3", "expected a list of offers"),
        ("- [unclosed", "not valid"),
    ],
)
def test_file_problems_are_reported_before_anything_is_written(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CatalogFileError) as raised:
        read_catalog(path)
    assert any(p.startswith(problem) for p in raised.value.problems), raised.value.problems


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    scrub = ("OFFERS_TABLE", "ACCOUNTS_TABLE", "LEDGER_TABLE", "IDEMPOTENCY_TABLE", "AWS_ENDPOINT_URL_DYNAMODB")
    env = {k: v for k, v in os.environ.items() if k not in scrub}
    return subprocess.run([sys.executable, "-m", "user_credits_dev.cli", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


def test_the_cli_loads_a_catalog_into_named_tables_and_refuses_a_bad_one(service: Any, tmp_path: Path) -> None:
    suffix = f"-{uuid.uuid4().hex[:8]}"
    prefix = service.backend.tables["OffersTable"].removesuffix("-OffersTable")
    where = ["--tables-prefix", prefix, "--endpoint-url", service.backend.endpoint]
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_example_offers(suffix)), encoding="utf-8")
    bad_offers = _example_offers(f"{suffix}-bad")
    bad_offers[0]["prices"] = {"usd": -1}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(bad_offers), encoding="utf-8")

    loaded = _cli("load-catalog", str(good), *where)
    refused = _cli("load-catalog", str(bad), *where)

    assert loaded.returncode == 0, loaded.stderr
    assert len(json.loads(loaded.stdout)["created"]) == len(bad_offers)
    assert refused.returncode == 2
    assert f"tokens-100{suffix}-bad: prices" in refused.stderr
    ids = {o["offerId"] for o in service.call("GET", "/admin/offers", iam=True).body["offers"]}
    assert f"tokens-100{suffix}" in ids
    assert not any(i.endswith(f"{suffix}-bad") for i in ids)
