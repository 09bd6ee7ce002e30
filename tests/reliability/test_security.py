"""SPEC 3 security promises, through the handlers of template.yaml (DynamoDB Local):
- a user only ever sees and changes the JWT subject's own orders, credits and ledger;
- every service/admin route refuses a caller who has only a JWT (403), and writes nothing;
- the webhook refuses events signed with another secret or replayed after the 5-minute tolerance;
- the Stripe API key, the webhook secret and PaymentIntent client secrets never reach the logs.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
import time_machine

from user_credits.store.models import LedgerRecord
from user_credits.store.orders import list_orders
from user_credits_dev import template as tpl
from user_credits_dev.stripe_fake import payment_intent_event, signed_delivery

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]

pytestmark = pytest.mark.ddblocal

ROUTES = [(m, p, auth) for spec in tpl.functions({}) for m, p, auth in spec.routes]
SERVICE_ROUTES = [(m, p) for m, p, auth in ROUTES if auth == "AWS_IAM"]
USER_ROUTES = [(m, p) for m, p, auth in ROUTES if auth == "UserJwt"]


def snapshot(shop: Shop, user: str) -> dict[str, Any]:
    """Everything the service holds for `user`: orders, balances and ledger."""
    orders = sorted((o.order_id, o.status, o.amount, o.payment_intent_id) for o in list_orders(user))
    records = LedgerRecord.query(user, consistent_read=True)
    ledger = sorted((r.offerGroup, int(r.seq), int(r.delta), r.reason) for r in records)
    credits = shop.service.call("GET", f"/users/{user}/credits", iam=True)
    assert credits.status == 200, credits.body
    return {"orders": orders, "ledger": ledger, "credits": credits.body}


@pytest.fixture
def victim(local_shop: Shop, ids: Any) -> dict[str, Any]:
    """A user with a paid order, a pending order, a balance and a ledger."""
    shop = local_shop
    offer_id, group = shop.offer(tokens=100)
    user = ids("victim")
    paid = shop.bought(user, offer_id)
    pending = shop.placed(user, offer_id)
    reply = shop.service.call("POST", f"/users/{user}/consume", {"offerGroup": group, "tokens": 30}, iam=True)
    assert reply.status == 200, reply.body
    return {"user": user, "offer": offer_id, "group": group, "paid": paid, "pending": pending}


# ---------------------------------------------------------------- one user, another user's data


def test_the_template_declares_an_authorizer_for_every_route_that_the_handlers_agree_with() -> None:
    from user_credits.api.auth import caller_kind

    expected = {"UserJwt": "user", "AWS_IAM": "service", "NONE": "stripe"}
    assert SERVICE_ROUTES and USER_ROUTES
    for method, path, auth in ROUTES:
        assert caller_kind(path.replace("{", "").replace("}", "")) == expected[auth], (method, path, auth)


def test_a_user_never_sees_another_users_order(local_shop: Shop, victim: dict[str, Any], ids: Any) -> None:
    shop, intruder = local_shop, ids("intruder")
    before = snapshot(shop, victim["user"])
    for order in (victim["paid"], victim["pending"]):
        reply = shop.service.call("GET", f"/orders/{order['orderId']}", user=intruder)
        assert (reply.status, reply.error) == (404, "order_not_found"), reply.body
        assert victim["user"] not in json.dumps(reply.body)
        # The owner does see it: the 404 is about who asks, not about the order.
        assert shop.service.call("GET", f"/orders/{order['orderId']}", user=victim["user"]).status == 200
    assert snapshot(shop, victim["user"]) == before


def test_user_routes_only_ever_show_the_jwt_subjects_own_credits_and_ledger(
    local_shop: Shop, victim: dict[str, Any], ids: Any
) -> None:
    shop, intruder = local_shop, ids("intruder")
    before = snapshot(shop, victim["user"])
    attempts: list[dict[str, str]] = [
        {}, {"offerGroup": victim["group"]}, {"userId": victim["user"]}, {"user": victim["user"]},
        {"sub": victim["user"]}, {"offerGroup": victim["group"], "limit": "100"},
    ]
    for query in attempts:
        credits = shop.service.call("GET", "/credits", user=intruder, query=query)
        if credits.status == 200:
            assert credits.body == {"userId": intruder, "groups": [], "orders": []}, (query, credits.body)
        else:
            assert 400 <= credits.status < 500 and credits.error, (query, credits.status, credits.body)
        ledger = shop.service.call("GET", "/credits/ledger", user=intruder, query=query)
        if ledger.status == 200:
            assert ledger.body["items"] == [], (query, ledger.body)
        else:
            assert 400 <= ledger.status < 500 and ledger.error, (query, ledger.status, ledger.body)
        for reply in (credits, ledger):
            assert victim["user"] not in json.dumps(reply.body), (query, reply.body)
    # A spoofed header naming the victim changes nothing either.
    spoof = {"X-User-Id": victim["user"], "X-Amz-User": victim["user"]}
    reply = shop.service.call("GET", "/credits", user=intruder, headers=spoof)
    assert reply.status == 200 and reply.body["userId"] == intruder
    # The victim, through the same routes, sees their own.
    own = shop.service.call("GET", "/credits", user=victim["user"])
    assert own.status == 200 and own.body["groups"][0]["balance"] == 70
    assert snapshot(shop, victim["user"]) == before


def test_a_user_can_neither_order_for_another_user_nor_replay_their_idempotency_key(
    local_shop: Shop, ids: Any
) -> None:
    shop, intruder, owner = local_shop, ids("intruder"), ids("owner")
    offer_id, _ = shop.offer()
    key = ids("shared-key")
    first = shop.order(owner, offer_id, key=key)
    assert first.status == 201
    before = snapshot(shop, owner)
    # Naming the victim in the body is refused (unknown field), not honoured.
    reply = shop.service.call("POST", "/orders", {"offerId": offer_id, "userId": owner}, user=intruder)
    assert reply.status == 422 and reply.error, reply.body
    # The same Idempotency-Key and body from another user is that user's own request: a new order,
    # never the owner's response (which carries the owner's clientSecret).
    other = shop.order(intruder, offer_id, key=key)
    assert other.status == 201, other.body
    assert other.body["order"]["userId"] == intruder
    assert other.body["order"]["orderId"] != first.body["order"]["orderId"]
    assert other.body["order"]["clientSecret"] != first.body["order"]["clientSecret"]
    assert snapshot(shop, owner) == before


@pytest.mark.parametrize(("method", "path"), SERVICE_ROUTES, ids=[f"{m} {p}" for m, p in SERVICE_ROUTES])
def test_every_service_route_refuses_a_caller_with_only_a_jwt(
    local_shop: Shop, victim: dict[str, Any], method: str, path: str
) -> None:
    shop = local_shop
    user = victim["user"]
    concrete = path.replace("{userId}", user).replace("{offerId}", victim["offer"])
    if "{holdId}" in path:
        # The victim's own open hold, so that only the caller decides the answer.
        held = shop.service.call("POST", f"/users/{user}/holds", {"offerGroup": victim["group"], "tokens": 1},
                                 iam=True)
        assert held.status == 201, held.body
        concrete = concrete.replace("{holdId}", held.body["holdId"])
    bodies = {
        "POST /users/{userId}/consume": {"offerGroup": victim["group"], "tokens": 1},
        "POST /users/{userId}/holds": {"offerGroup": victim["group"], "tokens": 1},
        "POST /users/{userId}/holds/{holdId}/settle": {"tokens": 1},
        "POST /admin/users/{userId}/grants": {"offerGroup": victim["group"], "tokens": 1000},
        "PUT /admin/offers/{offerId}": {"offerGroup": victim["group"], "tokens": 1, "cycle": "once",
                                        "prices": {"usd": 0}},
    }
    body = bodies.get(f"{method} {path}")
    offers_before = shop.service.call("GET", "/admin/offers", iam=True).body
    before = snapshot(shop, user)
    # Even the victim's own JWT (sub == the path's userId) is not a service caller.
    for caller in (user, "intruder-" + uuid.uuid4().hex[:8]):
        reply = shop.service.call(method, concrete, body, user=caller, headers={"Idempotency-Key": "k-1"})
        assert (reply.status, reply.error) == (403, "forbidden"), (caller, reply.status, reply.body)
        assert isinstance(reply.body.get("message"), str)
    # Without any authorizer context at all: refused too.
    reply = shop.service.call(method, concrete, body)
    assert reply.status == 403 and reply.error == "forbidden", reply.body
    assert snapshot(shop, user) == before
    assert shop.service.call("GET", "/admin/offers", iam=True).body == offers_before
    # The same request from an IAM-signed caller is served: the 403 was about the caller.
    assert shop.service.call(method, concrete, body, iam=True).status in (200, 201)


# ---------------------------------------------------------------- the webhook


def test_the_webhook_refuses_an_event_signed_with_another_secret_and_changes_nothing(
    local_shop: Shop, ids: Any
) -> None:
    shop = local_shop
    offer_id, group = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    before = snapshot(shop, user)
    event = payment_intent_event(shop.intent(order))
    for secret in ("whsec_someone_else", "whsec_local_fake_secre", "", "whsec_local_fake_secret "):
        reply = shop.deliver(event, secret=secret)
        assert (reply.status, reply.error) == (400, "invalid_signature"), (secret, reply.body)
    assert snapshot(shop, user) == before and shop.status(user, order["orderId"]) == "pending"
    assert shop.deliver(event).status == 200 and shop.group(user, group).balance == 100


@pytest.mark.parametrize("late", [301, 3600, 86400 * 3])
def test_the_webhook_refuses_a_delivery_replayed_after_the_tolerance_and_changes_nothing(
    local_shop: Shop, ids: Any, late: int
) -> None:
    shop = local_shop
    offer_id, group = shop.offer()
    user = ids("u")
    order = shop.placed(user, offer_id)
    before = snapshot(shop, user)
    from stripe_fixtures import WEBHOOK_PATH, WEBHOOK_SECRET

    signed_at = int(time.time())
    payload, signature = signed_delivery(payment_intent_event(shop.intent(order)), WEBHOOK_SECRET, signed_at)
    headers = {"Stripe-Signature": signature, "Content-Type": "application/json"}
    with time_machine.travel(signed_at + late, tick=True):
        reply = shop.service.call("POST", WEBHOOK_PATH, raw_body=payload.decode(), headers=headers)
        assert (reply.status, reply.error) == (400, "invalid_signature"), reply.body
    assert snapshot(shop, user) == before and shop.status(user, order["orderId"]) == "pending"
    # Within the tolerance the very same bytes are accepted.
    with time_machine.travel(signed_at + 240, tick=True):
        assert shop.service.call("POST", WEBHOOK_PATH, raw_body=payload.decode(), headers=headers).status == 200
    assert shop.group(user, group).balance == 100


# ---------------------------------------------------------------- secrets and logs


@pytest.fixture
def all_logs(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> Iterator[Any]:
    """Every log line: the Powertools logger's JSON (its handler's stream, swapped for a buffer; it
    was bound to the real stdout at import, before capsys), stdout/stderr, and every logging record
    at INFO and above, plus our own logger at DEBUG."""
    from user_credits.observability import logger

    buffer = io.StringIO()
    ours = logging.getLogger(logger.name)
    handlers = [h for h in ours.handlers if isinstance(h, logging.StreamHandler)]
    assert handlers, "the Powertools logger has no stream handler to capture"
    streams = [h.setStream(buffer) for h in handlers]
    level = ours.level
    ours.setLevel(logging.DEBUG)
    caplog.set_level(logging.INFO)

    def text() -> str:
        captured = capsys.readouterr()
        records = "\n".join(f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.__dict__}" for r in caplog.records)
        return "\n".join([buffer.getvalue(), captured.out, captured.err, records, caplog.text])

    try:
        yield text
    finally:
        ours.setLevel(level)
        for handler, stream in zip(handlers, streams, strict=True):
            if stream is not None:
                handler.setStream(stream)


def test_secrets_never_appear_in_the_logs_or_the_answers(
    local_shop: Shop, ids: Any, moto_backend: Any, monkeypatch: pytest.MonkeyPatch, all_logs: Any
) -> None:
    import boto3
    from aws_lambda_powertools.utilities import parameters
    from stripe_fixtures import API_KEY

    from user_credits.payments import gateway, secrets

    shop = local_shop
    webhook_secret = f"whsec_{uuid.uuid4().hex}"
    name = ids("stripe-secret")
    client = boto3.client("secretsmanager", endpoint_url=moto_backend.endpoint)
    client.create_secret(Name=name, SecretString=json.dumps({"apiKey": API_KEY, "webhookSecret": webhook_secret}))
    monkeypatch.delenv("STRIPE_API_KEY")
    monkeypatch.delenv("STRIPE_WEBHOOK_SECRET")
    monkeypatch.setenv("STRIPE_SECRET_NAME", name)
    monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", moto_backend.endpoint)
    parameters.clear_caches()
    monkeypatch.setattr(parameters.base, "DEFAULT_PROVIDERS", {})
    monkeypatch.setattr(gateway, "_clients", {})
    secrets.forget_cached_secret()
    replies: list[Any] = []

    def seen(reply: Any) -> Any:
        replies.append(reply)
        return reply

    try:
        offer_id, group = shop.offer()
        user = ids("u")
        created = shop.order(user, offer_id, key=ids("k"))  # a cold start: keys read from Secrets Manager
        assert created.status == 201, created.body
        client_secret = created.body["order"]["clientSecret"]
        assert client_secret
        shop.fake.fail_next(500)  # a failure is logged with its traceback
        assert seen(shop.order(user, offer_id)).status == 502
        event = payment_intent_event(shop.intent(created.body["order"]))
        assert seen(shop.deliver(event, secret="whsec_wrong")).status == 400
        assert seen(shop.deliver(event, secret=webhook_secret)).status == 200
        assert seen(shop.service.call("GET", f"/orders/{created.body['order']['orderId']}", user=user)).status == 200
        assert shop.group(user, group).balance == 100
        # A secret that cannot be read is a logged failure too.
        secrets.forget_cached_secret()
        parameters.clear_caches()
        monkeypatch.setenv("STRIPE_SECRET_NAME", ids("missing-secret"))
        assert seen(shop.order(user, offer_id)).status >= 500
    finally:
        secrets.forget_cached_secret()
        parameters.clear_caches()
    # Nor in any answer (only the 201 of POST /orders carries its own clientSecret, by design).
    for reply in replies:
        text = json.dumps([reply.body, reply.headers])
        assert all(s not in text for s in (API_KEY, webhook_secret, client_secret)), text
    logs = all_logs()
    assert "stripe event" in logs and "request failed" in logs  # the capture did see our log lines
    assert user in logs  # and their context
    for secret in (API_KEY, webhook_secret, client_secret):
        assert secret not in logs, secret
    assert client_secret.split("_secret_")[-1] not in logs
    assert "clientSecret" not in logs and "client_secret" not in logs
