"""template.yaml as an operator reads it: the shared environment is stated once (issue 14.2)."""

from __future__ import annotations

from user_credits_dev import template as tpl

SHARED = {"OFFERS_TABLE", "ACCOUNTS_TABLE", "LEDGER_TABLE", "IDEMPOTENCY_TABLE", "EVENT_BUS_NAME"}


def test_the_shared_environment_is_in_globals_and_no_function_repeats_it() -> None:
    shared = tpl.load_template()["Globals"]["Function"]["Environment"]["Variables"]
    assert set(shared) >= SHARED
    for logical, resource in tpl.resources("AWS::Serverless::Function").items():
        own = (resource["Properties"].get("Environment") or {}).get("Variables") or {}
        assert not set(own) & set(shared), f"{logical} repeats {sorted(set(own) & set(shared))} from Globals"


def test_every_function_gets_the_tables_and_the_bus_by_reference() -> None:
    tables = {"OffersTable": "o", "AccountsTable": "a", "LedgerTable": "l", "IdempotencyTable": "i",
              "EventBus": "bus"}
    for spec in tpl.functions(tables):
        env = spec.environment
        assert (env["OFFERS_TABLE"], env["ACCOUNTS_TABLE"], env["LEDGER_TABLE"], env["IDEMPOTENCY_TABLE"],
                env["EVENT_BUS_NAME"]) == ("o", "a", "l", "i", "bus"), spec.logical_id
