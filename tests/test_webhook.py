"""SPEC 2.4 through POST /webhooks/stripe: signatures, payments, refunds, on moto and DynamoDB Local."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import pytest

from user_credits.domain.durations import add_months
from user_credits_dev.stripe_fake import charge_refunded_event, payment_intent_event, sign, signed_delivery

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]


def close_to(actual: datetime | None, expected: datetime, slack: timedelta = timedelta(seconds=30)) -> bool:
    return actual is not None and abs(actual - expected) <= slack


def test_a_payment_credits_the_group_and_marks_the_order_paid(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(tokens=100, cycle="monthly", quantityLimit=3)
    user = ids("u")
    order = shop.placed(user, offer_id, quantity=2)
    before = datetime.now(UTC)
    reply = shop.pay(order)
    assert reply.status == 200 and reply.body == {"received": True}
    state = shop.group(user, group)
    assert state.balance == 200 and close_to(state.expires_at, add_months(before, 2))
    got = shop.service.call("GET", f"/orders/{order['orderId']}", user=user).body["order"]
    assert got["status"] == "paid" and close_to(datetime.fromisoformat(got["startsAt"]), before)
    assert datetime.fromisoformat(got["expiresAt"]) == state.expires_at
    [granted] = shop.service.events.of_type("CreditsGranted")
    lot_id = f"{order['orderId']}.0"
    assert granted == {"userId": user, "offerGroup": group, "balance": 200, "tokens": 200,
                       "expiresAt": got["expiresAt"], "orderId": order["orderId"], "lotIds": [lot_id]}
    assert [(int(e.delta), e.reason, e.orderId, e.lotId) for e in shop.ledger(user, group)] == [
        (200, "purchase", order["orderId"], lot_id)]
    # SPEC 1: the order is one lot, with the order's period.
    [lot] = state.book.lots
    assert (lot.lot_id, lot.source, lot.order_id, lot.granted, lot.remaining) == (
        lot_id, "order", order["orderId"], 200, 200)
    assert lot.expires_at == state.expires_at
    shop.assert_ledger_explains_balances(user, [group])


def test_five_duplicate_deliveries_credit_once(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(tokens=100)
    user = ids("u")
    order = shop.placed(user, offer_id)
    event = payment_intent_event(shop.intent(order))
    replies = [shop.deliver(event) for _ in range(5)]
    assert [r.status for r in replies] == [200] * 5
    assert shop.group(user, group).balance == 100
    assert len(shop.ledger(user, group)) == 1
    assert len(shop.service.events.of_type("CreditsGranted")) == 1
    shop.assert_ledger_explains_balances(user, [group])


@pytest.mark.parametrize("forgery", ["wrong_secret", "missing", "stale", "tampered", "garbage", "no_v1"])
def test_bad_signatures_are_400_and_change_nothing(shop: Shop, ids: Any, forgery: str) -> None:
    offer_id, group = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    event = payment_intent_event(shop.intent(order))
    if forgery == "wrong_secret":
        reply = shop.deliver(event, secret="whsec_someone_else")
    elif forgery == "missing":
        reply = shop.deliver(event, header="")
    elif forgery == "stale":
        reply = shop.deliver(event, timestamp=int(time.time()) - 301)
    elif forgery == "tampered":
        honest = payment_intent_event(shop.intent(order), amount_received=1)
        payload, header = signed_delivery(honest, "whsec_local_fake_secret")
        forged = payload.replace(b'"amount_received":1', b'"amount_received":1000')
        reply = shop.deliver(event, header=header, body=forged)
    elif forgery == "garbage":
        reply = shop.deliver(event, header="this is not a signature")
    else:
        reply = shop.deliver(event, header=f"t={int(time.time())},v0=abc")
    assert reply.status == 400 and reply.error == "invalid_signature", reply.body
    assert shop.status(user, order["orderId"]) == "pending"
    assert shop.group(user, group).balance == 0 and shop.ledger(user) == []
    assert shop.service.events.entries == []


def test_signature_is_checked_exactly_as_stripe_signs(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    payload, _ = signed_delivery(payment_intent_event(shop.intent(order)), "x")
    now = int(time.time())
    # Stripe may send several v1 signatures (secret rotation): one valid one is enough.
    header = f"t={now},v1={'0' * 64},{sign(payload, 'whsec_local_fake_secret', now).split(',')[1]}"
    reply = shop.deliver({}, header=header, body=payload)
    assert reply.status == 200 and shop.group(user, group).balance == 100


@pytest.mark.parametrize("mismatch", [{"amount_received": 999}, {"currency": "eur"}])
def test_amount_or_currency_mismatch_marks_inconsistent_and_credits_nothing(
    shop: Shop, ids: Any, mismatch: dict[str, Any]
) -> None:
    offer_id, group = shop.offer(prices={"usd": 1000, "eur": 1000})
    user = ids("u")
    order = shop.placed(user, offer_id)
    reply = shop.pay(order, **mismatch)
    assert reply.status == 200
    assert shop.status(user, order["orderId"]) == "inconsistent"
    assert shop.group(user, group).balance == 0 and shop.ledger(user) == []
    assert shop.service.events.of_type("CreditsGranted") == []
    [alert] = shop.service.events.of_type("PaymentInconsistent")
    assert alert["orderId"] == order["orderId"] and alert["userId"] == user and alert["offerGroup"] == group
    # A redelivery of the correct payment does not credit an inconsistent order either.
    assert shop.pay(order).status == 200 and shop.group(user, group).balance == 0


def test_monthly_plus_monthly_with_append_date_gives_about_two_months(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(cycle="monthly", appendDate=True)
    user = ids("u")
    start = datetime.now(UTC)
    shop.bought(user, offer_id)
    shop.bought(user, offer_id)
    state = shop.group(user, group)
    assert state.balance == 200 and close_to(state.expires_at, add_months(add_months(start, 1), 1))
    shop.assert_ledger_explains_balances(user, [group])


def test_yearly_then_monthly_keeps_the_yearly_expiry(shop: Shop, ids: Any) -> None:
    group = ids("grp")
    yearly, _ = shop.offer(group, cycle="yearly", tokens=1000)
    monthly, _ = shop.offer(group, cycle="monthly", tokens=100)
    user = ids("u")
    shop.bought(user, yearly)
    year_end = shop.group(user, group).expires_at
    shop.bought(user, monthly)
    state = shop.group(user, group)
    assert state.expires_at == year_end and state.balance == 1100


def test_a_bundle_credits_each_items_group(shop: Shop, ids: Any) -> None:
    item_id, item_group = shop.offer(tokens=10, cycle="weekly", prices={"usd": 100})
    bundle_id, main_group = shop.offer(
        tokens=100, cycle="monthly", quantityLimit=2,
        combinedItems=[{"offerId": item_id, "offerGroup": item_group, "quantity": 3}],
    )
    user = ids("u")
    start = datetime.now(UTC)
    order = shop.bought(user, bundle_id, quantity=2)
    main, item = shop.group(user, main_group), shop.group(user, item_group)
    assert main.balance == 200 and close_to(main.expires_at, add_months(start, 2))
    assert item.balance == 10 * 3 * 2 and close_to(item.expires_at, start + timedelta(weeks=6))
    assert {e["offerGroup"] for e in shop.service.events.of_type("CreditsGranted")} == {main_group, item_group}
    assert {(e.offerGroup, int(e.delta), e.orderId) for e in shop.ledger(user)} == {
        (main_group, 200, order["orderId"]), (item_group, 60, order["orderId"])}
    shop.assert_ledger_explains_balances(user, [main_group, item_group])


def test_an_expired_group_is_expired_before_a_new_purchase(shop: Shop, ids: Any) -> None:
    from seeding import seed_lot

    offer_id, group = shop.offer(tokens=100, appendDate=True)
    user = ids("u")
    past = datetime.now(UTC) - timedelta(days=1)
    seed_lot(user, group, 40, expires_at=past, at=past - timedelta(days=1))
    start = datetime.now(UTC)
    shop.bought(user, offer_id)
    state = shop.group(user, group)
    assert state.balance == 100 and close_to(state.expires_at, add_months(start, 1))
    assert [(int(e.delta), e.reason) for e in shop.ledger(user, group)] == [
        (40, "grant"), (-40, "expire"), (100, "purchase")]
    shop.assert_ledger_explains_balances(user, [group])


def test_a_quarter_refund_revokes_a_quarter(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(tokens=1000, prices={"usd": 2000})
    user = ids("u")
    order = shop.bought(user, offer_id)
    assert shop.refund(order, 500).status == 200
    assert shop.group(user, group).balance == 750
    assert shop.status(user, order["orderId"]) == "partially_refunded"
    # Stripe's amount_refunded is cumulative: a later full refund takes only the rest, a replay nothing.
    assert shop.refund(order, 500).status == 200
    assert shop.group(user, group).balance == 750
    assert shop.refund(order, 2000).status == 200
    assert shop.group(user, group).balance == 0
    record = shop.order_record(user, order["orderId"])
    assert record.status == "refunded" and int(record.revokedTokens) == 1000
    assert [(int(e.delta), e.reason) for e in shop.ledger(user, group)] == [
        (1000, "purchase"), (-250, "refund"), (-750, "refund")]
    shop.assert_ledger_explains_balances(user, [group])


def test_refund_found_through_charge_metadata_too(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(tokens=100, prices={"usd": 400})
    user = ids("u")
    order = shop.bought(user, offer_id)
    assert shop.refund(order, 100, with_metadata=True).status == 200
    assert shop.group(user, group).balance == 75


def test_refund_never_takes_the_balance_below_zero_and_records_the_shortfall(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(tokens=100, prices={"usd": 1000})
    user = ids("u")
    order = shop.bought(user, offer_id)
    # Most of the tokens were spent before the refund came in.
    spent = shop.service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": 90}, iam=True)
    assert spent.status == 200
    assert shop.refund(order, 1000).status == 200
    assert shop.group(user, group).balance == 0
    last = shop.ledger(user, group)[-1]
    assert (int(last.delta), last.reason, int(last.shortfall)) == (-10, "refund", 90)
    assert shop.status(user, order["orderId"]) == "refunded"
    shop.assert_ledger_explains_balances(user, [group])


def test_a_bundle_refund_revokes_proportionally_from_each_group(shop: Shop, ids: Any) -> None:
    item_id, item_group = shop.offer(tokens=40, prices={"usd": 100})
    bundle_id, main_group = shop.offer(
        tokens=100, prices={"usd": 1000}, combinedItems=[{"offerId": item_id, "offerGroup": item_group,
                                                            "quantity": 1}])
    user = ids("u")
    order = shop.bought(user, bundle_id)
    assert shop.refund(order, 500).status == 200
    assert (shop.group(user, main_group).balance, shop.group(user, item_group).balance) == (50, 20)
    shop.assert_ledger_explains_balances(user, [main_group, item_group])


def test_failed_then_succeeded_payment_is_credited(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    assert shop.deliver(payment_intent_event(shop.intent(order), "payment_intent.payment_failed")).status == 200
    assert shop.status(user, order["orderId"]) == "failed"
    assert shop.pay(order).status == 200
    assert shop.status(user, order["orderId"]) == "paid" and shop.group(user, group).balance == 100


def test_canceled_payment_is_canceled_and_credits_nothing(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    assert shop.deliver(payment_intent_event(shop.intent(order), "payment_intent.canceled")).status == 200
    assert shop.status(user, order["orderId"]) == "canceled"
    assert shop.pay(order).status == 200
    assert shop.status(user, order["orderId"]) == "canceled" and shop.group(user, group).balance == 0


def test_other_event_types_and_unknown_orders_are_acknowledged(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer()
    order = shop.placed(ids("u"), offer_id)
    other = payment_intent_event(shop.intent(order), "payment_intent.created")
    assert shop.deliver(other).status == 200
    stranger = payment_intent_event({"id": "pi_x", "amount": 5, "currency": "usd",
                                     "metadata": {"orderId": "nope", "userId": "nobody"}})
    assert shop.deliver(stranger).status == 200
    no_order = charge_refunded_event({"id": "pi_unknown", "amount": 5, "currency": "usd"}, 5)
    assert shop.deliver(no_order).status == 200


def test_a_refund_before_its_payment_is_applied_when_the_payment_arrives(shop: Shop, ids: Any) -> None:
    """Stripe does not deliver in order: the refund waits on the order, and the payment applies it."""
    offer_id, group = shop.offer(tokens=1000, prices={"usd": 2000})
    user = ids("u")
    order = shop.placed(user, offer_id)
    assert shop.refund(order, 500, with_metadata=True).status == 200
    assert shop.status(user, order["orderId"]) == "pending" and shop.ledger(user) == []
    # A redelivered or smaller earlier refund changes nothing; a larger one replaces it.
    assert shop.refund(order, 250, with_metadata=True).status == 200
    assert shop.refund(order, 500, with_metadata=True).status == 200
    assert shop.refund(order, 1000, with_metadata=True).status == 200
    assert shop.pay(order).status == 200
    assert shop.group(user, group).balance == 500
    record = shop.order_record(user, order["orderId"])
    assert record.status == "partially_refunded" and int(record.amountRefunded) == 1000
    assert int(record.revokedTokens) == 500 and record.pendingRefund is None
    assert [(int(e.delta), e.reason) for e in shop.ledger(user, group)] == [(1000, "purchase"), (-500, "refund")]
    # The payment again, and the refund again, after the fact: nothing more.
    assert shop.pay(order).status == 200
    assert shop.refund(order, 1000).status == 200
    assert shop.group(user, group).balance == 500
    shop.assert_ledger_explains_balances(user, [group])


def test_a_full_refund_before_its_payment_leaves_nothing(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(tokens=1000, prices={"usd": 2000})
    user = ids("u")
    order = shop.placed(user, offer_id)
    assert shop.refund(order, 2000, with_metadata=True).status == 200
    assert shop.pay(order).status == 200
    assert shop.group(user, group).balance == 0
    assert shop.status(user, order["orderId"]) == "refunded"
    shop.assert_ledger_explains_balances(user, [group])


def test_a_base64_encoded_body_is_verified_on_its_decoded_bytes(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    payload, header = signed_delivery(payment_intent_event(shop.intent(order)), "whsec_local_fake_secret")
    reply = shop.service.call("POST", "/webhooks/stripe", raw_body=payload,
                              headers={"Stripe-Signature": header})
    assert reply.status == 200 and shop.group(user, group).balance == 100


def test_stripe_keys_come_from_secrets_manager_once_per_cold_start(
    shop: Shop, ids: Any, moto_backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import boto3
    from aws_lambda_powertools.utilities import parameters

    from user_credits.payments import secrets

    name = ids("stripe-secret")
    client = boto3.client("secretsmanager", endpoint_url=moto_backend.endpoint)
    client.create_secret(Name=name, SecretString=json.dumps(
        {"apiKey": "sk_test_local_fake", "webhookSecret": "whsec_from_secrets_manager"}))
    monkeypatch.delenv("STRIPE_API_KEY")
    monkeypatch.delenv("STRIPE_WEBHOOK_SECRET")
    monkeypatch.setenv("STRIPE_SECRET_NAME", name)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_backend.endpoint)
    parameters.clear_caches()
    monkeypatch.setattr(parameters.base, "DEFAULT_PROVIDERS", {})
    secrets.forget_cached_secret()

    offer_id, group = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    # Gone from Secrets Manager: a warm function keeps what its cold start read.
    client.delete_secret(SecretId=name, ForceDeleteWithoutRecovery=True)
    parameters.clear_caches()
    event = payment_intent_event(shop.intent(order))
    assert shop.deliver(event, secret="whsec_local_fake_secret").status == 400
    assert shop.deliver(event, secret="whsec_from_secrets_manager").status == 200
    assert shop.group(user, group).balance == 100
    secrets.forget_cached_secret()


def test_a_payment_without_our_metadata_is_matched_by_its_payment_intent(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    intent = {**shop.intent(order), "metadata": {}}
    assert shop.deliver(payment_intent_event(intent)).status == 200
    assert shop.status(user, order["orderId"]) == "paid" and shop.group(user, group).balance == 100
