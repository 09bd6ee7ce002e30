"""SPEC 2.3 and the order routes: POST /orders and GET /orders/{orderId}, on moto and DynamoDB Local."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from user_credits.store.models import IdempotencyRecord

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]


def test_an_order_creates_a_payment_intent_for_exactly_its_amount_and_currency(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(prices={"usd": 999, "eur": 899}, quantityLimit=5)
    user = ids("u")
    reply = shop.order(user, offer_id, quantity=3, currency="eur")
    assert reply.status == 201, reply.body
    order = reply.body["order"]
    assert order["status"] == "pending" and order["amount"] == 3 * 899 and order["currency"] == "eur"
    assert order["tokens"] == 300 and order["offerGroup"] == group and order["userId"] == user
    assert order["startsAt"] is None and order["expiresAt"] is None
    intent = shop.intent(order)
    assert (intent["amount"], intent["currency"]) == (3 * 899, "eur")
    assert intent["metadata"] == {"orderId": order["orderId"], "userId": user}
    assert order["clientSecret"] == intent["client_secret"]
    create = next(h for m, p, h in shop.fake.requests if m == "POST" and p == "/v1/payment_intents"
                  and h.get("idempotency-key") == order["orderId"])
    assert create["authorization"] == "Bearer sk_test_local_fake"


def test_quantity_and_currency_default_to_one_and_the_default_currency(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer(prices={"usd": 500, "eur": 450})
    order = shop.placed(ids("u"), offer_id)
    assert (order["quantity"], order["currency"], order["amount"]) == (1, "usd", 500)


def test_get_order_shows_the_owner_the_order_without_client_secret(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    reply = shop.service.call("GET", f"/orders/{order['orderId']}", user=user)
    assert reply.status == 200
    expected = {k: v for k, v in order.items() if k != "clientSecret"}
    assert reply.body["order"] == expected


def test_get_order_of_another_user_is_404(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer()
    order = shop.placed(ids("owner"), offer_id)
    reply = shop.service.call("GET", f"/orders/{order['orderId']}", user=ids("someone-else"))
    assert reply.status == 404 and reply.error == "order_not_found"
    missing = shop.service.call("GET", "/orders/no-such-order", user=ids("u"))
    assert missing.status == 404 and missing.error == "order_not_found"


def test_orders_need_a_signed_in_user(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer()
    assert shop.service.call("POST", "/orders", {"offerId": offer_id}).status == 401
    assert shop.service.call("GET", "/orders/x").status == 401


def test_unknown_offer_is_404(shop: Shop, ids: Any) -> None:
    reply = shop.order(ids("u"), ids("missing-offer"))
    assert reply.status == 404 and reply.error == "offer_not_found"


def test_inactive_offer_cannot_be_ordered(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer(active=False)
    reply = shop.order(ids("u"), offer_id)
    assert reply.status == 409 and reply.error == "offer_inactive"


def test_locked_offer_cannot_be_ordered_until_unlocked(shop: Shop, ids: Any) -> None:
    base_id, base_group = shop.offer()
    locked_id, _ = shop.offer(unlockedBy=[base_group])
    user = ids("u")
    reply = shop.order(user, locked_id)
    assert reply.status == 409 and reply.error == "offer_locked"
    shop.bought(user, base_id)
    assert shop.order(user, locked_id).status == 201


def test_quantity_over_the_limit_is_refused(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer(quantityLimit=2)
    created_before = shop.fake.created_count()
    reply = shop.order(ids("u"), offer_id, quantity=3)
    assert reply.status == 422 and reply.error == "quantity_limit_exceeded"
    assert shop.fake.created_count() == created_before


def test_currency_without_a_price_is_refused(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer(prices={"usd": 100})
    reply = shop.order(ids("u"), offer_id, currency="eur")
    assert reply.status == 422 and reply.error == "currency_not_supported"


def test_order_input_is_strict(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer()
    user = ids("u")
    created_before = shop.fake.created_count()
    for body in ({"offerId": offer_id, "quantity": "2"}, {"offerId": offer_id, "quantity": 2.0},
                 {"offerId": offer_id, "quantity": 0}, {"offerId": offer_id, "quantity": True},
                 {"offerId": offer_id, "qty": 2}, {"offerId": "bad id!"}, {}):
        reply = shop.service.call("POST", "/orders", body, user=user)
        assert reply.status in (400, 422) and reply.error == "validation_error", (body, reply.body)
    assert shop.service.call("POST", "/orders", raw_body="{not json", user=user).status == 400
    assert shop.fake.created_count() == created_before


def test_free_order_is_paid_and_credited_at_once_without_stripe(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(prices={"usd": 0}, tokens=50, cycle="once")
    user = ids("u")
    created_before = shop.fake.created_count()
    order = shop.placed(user, offer_id, quantity=2)
    assert order["status"] == "paid" and order["amount"] == 0 and order["paymentIntentId"] is None
    assert order["startsAt"] is not None and order["expiresAt"] is None
    assert "clientSecret" not in order
    assert shop.fake.created_count() == created_before
    state = shop.group(user, group)
    assert (state.balance, state.expires_at) == (100, None)
    assert [e["offerGroup"] for e in shop.service.events.of_type("CreditsGranted")] == [group]
    shop.assert_ledger_explains_balances(user, [group])


def test_same_idempotency_key_returns_the_first_response_and_one_payment_intent(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer()
    user, key = ids("u"), ids("key")
    first = shop.order(user, offer_id, key=key, quantity=1)
    again = shop.order(user, offer_id, key=key, quantity=1)
    assert first.status == again.status == 201
    assert again.body == first.body and "clientSecret" in again.body["order"]
    intents = [i for i in shop.fake.intents.values() if i["metadata"].get("userId") == user]
    assert len(intents) == 1


def test_same_idempotency_key_with_another_body_is_refused(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer(quantityLimit=5)
    user, key = ids("u"), ids("key")
    assert shop.order(user, offer_id, key=key).status == 201
    reply = shop.order(user, offer_id, key=key, quantity=2)
    assert reply.status == 422 and reply.error == "idempotency_key_reused"


def test_a_retry_after_a_lost_write_reuses_the_same_payment_intent(shop: Shop, ids: Any) -> None:
    """The function died after Stripe answered but before the order was stored: the retry with the
    same key derives the same order id, so Stripe's idempotency returns the same PaymentIntent."""
    offer_id, _ = shop.offer()
    user, key = ids("u"), ids("key")
    first = shop.order(user, offer_id, key=key)
    order_id = first.body["order"]["orderId"]
    # Forget the order and the key record, as if that write had never happened.
    shop.order_record(user, order_id).delete()
    for record in IdempotencyRecord.scan(IdempotencyRecord.key.contains(key)):
        record.delete()
    retry = shop.order(user, offer_id, key=key)
    assert retry.status == 201
    assert retry.body["order"]["orderId"] == order_id
    assert retry.body["order"]["paymentIntentId"] == first.body["order"]["paymentIntentId"]


def test_stripe_failure_is_502_and_stores_nothing(shop: Shop, ids: Any) -> None:
    offer_id, _ = shop.offer()
    user = ids("u")
    shop.fake.fail_next(500)
    reply = shop.order(user, offer_id)
    assert reply.status == 502 and reply.error == "payment_provider_error"
    assert shop.service.call("GET", "/orders/x", user=user).status == 404
    from user_credits.store.orders import list_orders

    assert list_orders(user) == []


def test_an_order_keeps_what_was_bought_when_the_catalog_changes(shop: Shop, ids: Any) -> None:
    offer_id, group = shop.offer(tokens=100)
    user = ids("u")
    order = shop.placed(user, offer_id)
    shop.service.call("PUT", f"/admin/offers/{offer_id}",
                      {"offerGroup": group, "tokens": 5, "cycle": "monthly", "prices": {"usd": 1000}}, iam=True)
    assert shop.pay(order).status == 200
    assert shop.group(user, group).balance == 100


def test_only_the_order_and_webhook_functions_import_stripe() -> None:
    """Cold-start budget: `stripe` is a large import, so no other function may pull it in."""
    import subprocess
    import sys

    from user_credits_dev import template as tpl

    for spec in tpl.functions({}):
        code = (
            "import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('app', {str(spec.code_uri / 'app.py')!r})\n"
            "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
            "print('stripe' in sys.modules)\n"
        )
        if not (spec.code_uri / "app.py").exists():
            continue
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**__import__("os").environ, "PYTHONPATH": str(tpl.REPO_ROOT / "shared")})
        imports_stripe = out.stdout.strip() == "True"
        assert imports_stripe == (spec.logical_id in ("CreateOrderFunction", "StripeWebhookFunction")), spec.logical_id


def test_a_retry_after_a_lost_write_with_another_body_is_refused(shop: Shop, ids: Any) -> None:
    """Stripe remembers the derived order id as its idempotency key even when we lost our record."""
    offer_id, _ = shop.offer(quantityLimit=5)
    user, key = ids("u"), ids("key")
    first = shop.order(user, offer_id, key=key)
    shop.order_record(user, first.body["order"]["orderId"]).delete()
    for record in IdempotencyRecord.scan(IdempotencyRecord.key.contains(key)):
        record.delete()
    retry = shop.order(user, offer_id, key=key, quantity=2)
    assert retry.status == 422 and retry.error == "idempotency_key_reused"
