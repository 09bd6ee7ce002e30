"""The local Stripe fake's Customers, Checkout Sessions, portal sessions, subscriptions and invoices.

Fast: no service, no DynamoDB. Requests go through stripe-python's `StripeClient`, as the service sends
them. The shapes are held against Stripe's own: the key sets below are those of stripe/openapi's
`openapi/fixtures3.json` at the API version the fake's events carry (2025-09-30.clover).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
import stripe

from user_credits_dev import cli, server
from user_credits_dev.stripe_fake import (
    API_VERSION,
    FakeStripe,
    add_months,
    documented_names,
    period_boundary,
)

API_KEY = "sk_test_fake_subscriptions"

# stripe/openapi openapi/fixtures3.json (commit 98378bb, 2025-10-21: API version 2025-09-30.clover).
FIXTURE_KEYS = {
    "checkout.session": """adaptive_pricing after_expiration allow_promotion_codes amount_subtotal amount_total
        automatic_tax billing_address_collection cancel_url client_reference_id client_secret collected_information
        consent consent_collection created currency currency_conversion custom_fields custom_text customer
        customer_creation customer_details customer_email discounts expires_at id invoice invoice_creation livemode
        locale metadata mode object origin_context payment_intent payment_link payment_method_collection
        payment_method_configuration_details payment_method_options payment_method_types payment_status
        permissions phone_number_collection recovered_from saved_payment_method_options setup_intent
        shipping_address_collection shipping_cost shipping_options status submit_type subscription success_url
        total_details ui_mode url wallet_options""",
    "subscription": """application application_fee_percent automatic_tax billing_cycle_anchor
        billing_cycle_anchor_config billing_mode billing_thresholds cancel_at cancel_at_period_end canceled_at
        cancellation_details collection_method created currency customer days_until_due default_payment_method
        default_source default_tax_rates description discounts ended_at id invoice_settings items latest_invoice
        livemode metadata next_pending_invoice_item_invoice object on_behalf_of pause_collection payment_settings
        pending_invoice_item_interval pending_setup_intent pending_update schedule start_date status test_clock
        transfer_data trial_end trial_settings trial_start""",
    "subscription_item": """billing_thresholds created current_period_end current_period_start discounts id
        metadata object plan price quantity subscription tax_rates""",
    # The fixture still lists a top-level `subscription` on invoices and invoice lines; Stripe removed both
    # in 2025-03-31.basil (changelog: "adds new parent field to invoicing objects"), so the fake has neither.
    "invoice": """account_country account_name account_tax_ids amount_due amount_overpaid amount_paid
        amount_remaining amount_shipping application attempt_count attempted auto_advance automatic_tax
        automatically_finalizes_at billing_reason collection_method created currency custom_fields customer
        customer_address customer_email customer_name customer_phone customer_shipping customer_tax_exempt
        customer_tax_ids default_payment_method default_source default_tax_rates description discounts due_date
        effective_at ending_balance footer from_invoice hosted_invoice_url id invoice_pdf issuer
        last_finalization_error latest_revision lines livemode metadata next_payment_attempt number object
        on_behalf_of parent payment_settings period_end period_start post_payment_credit_notes_amount
        pre_payment_credit_notes_amount receipt_number rendering shipping_cost shipping_details starting_balance
        statement_descriptor status status_transitions subtotal subtotal_excluding_tax test_clock total
        total_discount_amounts total_excluding_tax total_pretax_credit_amounts total_taxes webhooks_delivered_at""",
    "line_item": """amount currency description discount_amounts discountable discounts id invoice livemode
        metadata object parent period pretax_credit_amounts pricing quantity taxes""",
    "customer": """address balance created currency default_source delinquent description discount email id
        invoice_prefix invoice_settings livemode metadata name next_invoice_sequence object phone
        preferred_locales shipping tax_exempt test_clock""",
    "billing_portal.session": "configuration created customer flow id livemode locale object on_behalf_of "
                              "return_url url",
    "price": """active billing_scheme created currency custom_unit_amount id livemode lookup_key metadata nickname
        object product recurring tax_behavior tiers_mode transform_quantity type unit_amount unit_amount_decimal""",
}


def keys(kind: str) -> set[str]:
    return set(FIXTURE_KEYS[kind].split())


class Clock:
    def __init__(self, moment: datetime) -> None:
        self.now = moment.timestamp()

    def __call__(self) -> float:
        return self.now


def at(year: int, month: int, day: int, hour: int = 12) -> datetime:
    return datetime(year, month, day, hour, tzinfo=UTC)


def ts(moment: datetime) -> int:
    return int(moment.timestamp())


@pytest.fixture
def clock() -> Clock:
    return Clock(at(2028, 1, 31))


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeStripe]:
    with FakeStripe(api_key=API_KEY, clock=clock) as running:
        yield running


@pytest.fixture
def client(fake: FakeStripe) -> stripe.StripeClient:
    return stripe.StripeClient(API_KEY, base_addresses={"api": fake.base_url}, max_network_retries=0)


def customer_for(client: stripe.StripeClient, user: str = "user-1") -> str:
    created = client.v1.customers.create(params={"metadata": {"userId": user}},
                                         options={"idempotency_key": f"customer-{user}"})
    return str(created.id)


def subscription_params(customer: str, order: str = "order-1", *, interval: str = "month", count: int = 1,
                        quantity: int = 1) -> dict[str, Any]:
    """What the service sends for a recurring offer (SPEC 2.10)."""
    return {
        "mode": "subscription", "customer": customer,
        "success_url": "https://app.example/ok", "cancel_url": "https://app.example/cancel",
        "client_reference_id": order, "metadata": {"orderId": order, "userId": "user-1"},
        "line_items": [{"quantity": quantity, "price_data": {
            "currency": "usd", "unit_amount": 1500, "product_data": {"name": "Pro monthly"},
            "recurring": {"interval": interval, "interval_count": count}}}],
        "subscription_data": {"metadata": {"orderId": order, "userId": "user-1", "offerId": "pro-monthly"}},
    }


def payment_params(customer: str, order: str = "order-2") -> dict[str, Any]:
    """What the service sends for a one-time offer checked out (SPEC 2.10)."""
    return {
        "mode": "payment", "customer": customer,
        "success_url": "https://app.example/ok", "cancel_url": "https://app.example/cancel",
        "client_reference_id": order, "metadata": {"orderId": order, "userId": "user-1"},
        "line_items": [{"quantity": 2, "price_data": {
            "currency": "eur", "unit_amount": 450, "product_data": {"name": "Top-up 500"}}}],
        "payment_intent_data": {"metadata": {"orderId": order, "userId": "user-1"}},
    }


def subscribed(fake: FakeStripe, client: stripe.StripeClient, **kwargs: Any) -> tuple[str, list[dict[str, Any]]]:
    session = client.v1.checkout.sessions.create(params=subscription_params(customer_for(client), **kwargs),
                                                 options={"idempotency_key": "order-1"})
    events = fake.complete_session(str(session.id))
    return str(events[1]["data"]["object"]["id"]), events


def form_post(fake: FakeStripe, path: str, data: dict[str, str], key: str | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return requests.post(f"{fake.base_url}{path}", data=data, headers=headers, timeout=10)


# ---------------------------------------------------------------- documented parameters only


@pytest.mark.parametrize(("path", "data", "param"), [
    ("/v1/checkout/sessions", {"mode": "payment", "line_itmes[0][quantity]": "1"}, "line_itmes"),
    ("/v1/checkout/sessions", {"mode": "subscription",
                               "line_items[0][price_data][recurring][intervall]": "month"},
     "line_items[0][price_data][recurring][intervall]"),
    ("/v1/checkout/sessions", {"mode": "payment", "payment_intent_data[metadata][orderId]": "o",
                               "payment_intent_data[idempotency_key]": "o"}, "payment_intent_data[idempotency_key]"),
    ("/v1/customers", {"metadata[userId]": "u", "user_id": "u"}, "user_id"),
    ("/v1/billing_portal/sessions", {"customer": "cus_x", "return_uri": "https://app.example"}, "return_uri"),
    ("/v1/payment_intents", {"amount": "100", "currency": "usd", "order_id": "o"}, "order_id"),
])
def test_an_undocumented_parameter_is_refused_as_stripe_refuses_it(
        fake: FakeStripe, path: str, data: dict[str, str], param: str) -> None:
    response = form_post(fake, path, data)

    assert response.status_code == 400
    assert response.json() == {"error": {
        "type": "invalid_request_error", "code": "parameter_unknown", "param": param,
        "message": f"Received unknown parameter: {param}",
        "doc_url": "https://stripe.com/docs/error-codes/parameter-unknown",
    }}


def test_the_sdk_sees_stripes_invalid_request_error(client: stripe.StripeClient) -> None:
    params = subscription_params(customer_for(client))
    params["subscription_data"]["trial_days"] = 7  # the documented name is trial_period_days

    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.checkout.sessions.create(params=params)

    assert refused.value.http_status == 400 and refused.value.code == "parameter_unknown"
    assert refused.value.param == "subscription_data[trial_days]"


def test_every_parameter_the_service_sends_is_documented() -> None:
    checkout = documented_names("POST /v1/checkout/sessions")
    assert {
        "mode", "customer", "success_url", "cancel_url", "client_reference_id", "metadata[*]",
        "line_items[][quantity]", "line_items[][price_data][currency]", "line_items[][price_data][unit_amount]",
        "line_items[][price_data][product_data][name]", "line_items[][price_data][recurring][interval]",
        "line_items[][price_data][recurring][interval_count]", "subscription_data[metadata][*]",
        "payment_intent_data[metadata][*]",
    } <= checkout
    assert "metadata[*]" in documented_names("POST /v1/customers")
    assert {"customer", "return_url"} <= documented_names("POST /v1/billing_portal/sessions")
    assert "idempotency_key" not in checkout  # a client option (a header), never a parameter


@pytest.mark.parametrize(("change", "code", "param"), [
    ({"line_items": [{"quantity": "two"}]}, "parameter_invalid_integer", "line_items[0][quantity]"),
    ({"mode": "subscriptions"}, None, "mode"),
    ({"line_items": [{"quantity": 1, "price_data": {"unit_amount": 100, "product_data": {"name": "x"},
                                                    "recurring": {"interval": "month"}}}]},
     "parameter_missing", "line_items[0][price_data][currency]"),
    ({"line_items": [{"quantity": 1, "price_data": {"currency": "usd", "unit_amount": 100,
                                                    "product_data": {"name": "x"},
                                                    "recurring": {"interval": "fortnight"}}}]},
     None, "line_items[0][price_data][recurring][interval]"),
    ({"customer": "cus_nobody"}, "resource_missing", "customer"),
    ({"payment_intent_data": {"metadata": {"orderId": "o"}}}, None, "payment_intent_data"),
])
def test_values_stripe_would_refuse_are_refused(
        client: stripe.StripeClient, change: dict[str, Any], code: str | None, param: str) -> None:
    params = {**subscription_params(customer_for(client)), **change}

    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.checkout.sessions.create(params=params)

    assert (refused.value.code, refused.value.param) == (code, param)


def test_a_payment_mode_session_refuses_a_recurring_price(client: stripe.StripeClient) -> None:
    params = payment_params(customer_for(client))
    params["line_items"][0]["price_data"]["recurring"] = {"interval": "month"}

    with pytest.raises(stripe.InvalidRequestError, match="recurring price"):
        client.v1.checkout.sessions.create(params=params)


# ---------------------------------------------------------------- idempotency


def test_the_same_key_and_parameters_replay_the_first_answer(fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = customer_for(client)
    again = customer_for(client)
    assert again == customer and len(fake.customers) == 1

    params = subscription_params(customer)
    first = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "order-1"})
    replay = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "order-1"})

    assert replay.id == first.id and replay.url == first.url and len(fake.sessions) == 1
    raw = form_post(fake, "/v1/customers", {"metadata[userId]": "user-1"}, key="customer-user-1")
    assert raw.headers.get("Idempotent-Replayed") == "true" and raw.json()["id"] == customer


def test_the_same_key_with_other_parameters_is_an_idempotency_error(
        fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = customer_for(client)
    client.v1.checkout.sessions.create(params=subscription_params(customer), options={"idempotency_key": "order-1"})

    other = subscription_params(customer, quantity=2)
    with pytest.raises(stripe.IdempotencyError):
        client.v1.checkout.sessions.create(params=other, options={"idempotency_key": "order-1"})
    with pytest.raises(stripe.IdempotencyError, match="same endpoint"):
        client.v1.customers.create(params={"metadata": {"userId": "user-1"}}, options={"idempotency_key": "order-1"})
    assert len(fake.sessions) == 1


def test_a_request_refused_for_its_parameters_is_not_remembered(client: stripe.StripeClient) -> None:
    params = subscription_params(customer_for(client))
    with pytest.raises(stripe.InvalidRequestError):
        client.v1.checkout.sessions.create(params={**params, "modee": "x"}, options={"idempotency_key": "order-1"})

    created = client.v1.checkout.sessions.create(params=params, options={"idempotency_key": "order-1"})

    assert created.status == "open"


# ---------------------------------------------------------------- shapes


def test_customer_and_open_session_have_stripes_shape(fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = customer_for(client)
    assert set(fake.customer(customer)) == keys("customer")
    assert client.v1.customers.retrieve(customer).metadata.to_dict() == {"userId": "user-1"}

    session = client.v1.checkout.sessions.create(params=subscription_params(customer, quantity=3))

    found = fake.session(str(session.id))
    assert set(found) == keys("checkout.session")
    assert found["id"].startswith("cs_test_") and found["object"] == "checkout.session"
    assert (found["status"], found["payment_status"], found["mode"]) == ("open", "unpaid", "subscription")
    assert (found["amount_total"], found["currency"], found["customer"]) == (4500, "usd", customer)
    assert found["metadata"] == {"orderId": "order-1", "userId": "user-1"}
    assert found["client_reference_id"] == "order-1" and found["url"].startswith(fake.base_url)
    assert found["subscription"] is None and found["payment_intent"] is None
    assert client.v1.checkout.sessions.retrieve(str(session.id)).status == "open"
    assert requests.get(found["url"], timeout=10).status_code == 200  # the stand-in for Stripe's page


def test_completing_a_payment_session(fake: FakeStripe, client: stripe.StripeClient, clock: Clock) -> None:
    session = client.v1.checkout.sessions.create(params=payment_params(customer_for(client)))

    events = fake.complete_session(str(session.id))

    assert [e["type"] for e in events] == ["checkout.session.completed", "payment_intent.succeeded"]
    completed = events[0]["data"]["object"]
    assert (completed["status"], completed["payment_status"]) == ("complete", "paid")
    assert (completed["amount_total"], completed["currency"]) == (900, "eur")
    assert completed["metadata"] == {"orderId": "order-2", "userId": "user-1"}
    intent = fake.intent(completed["payment_intent"])
    assert (intent["status"], intent["amount_received"], intent["currency"]) == ("succeeded", 900, "eur")
    assert intent["metadata"] == {"orderId": "order-2", "userId": "user-1"}  # payment_intent_data.metadata
    assert events[1]["data"]["object"]["id"] == intent["id"]
    for event in events:
        assert event["object"] == "event" and event["api_version"] == API_VERSION
        assert event["created"] == int(clock.now)
    with pytest.raises(ValueError, match="not open"):
        fake.complete_session(str(session.id))


def test_completing_a_subscription_session(fake: FakeStripe, client: stripe.StripeClient, clock: Clock) -> None:
    start = ts(at(2028, 1, 31))

    subscription_id, events = subscribed(fake, client, quantity=2)

    assert [e["type"] for e in events] == [
        "checkout.session.completed", "customer.subscription.created", "invoice.paid"]
    completed, created, paid = (e["data"]["object"] for e in events)
    assert completed["subscription"] == subscription_id and completed["invoice"] == paid["id"]
    assert (completed["status"], completed["payment_status"]) == ("complete", "paid")

    assert set(created) == keys("subscription")
    assert (created["status"], created["cancel_at_period_end"], created["customer"]) == (
        "active", False, completed["customer"])
    assert created["metadata"] == {"orderId": "order-1", "userId": "user-1", "offerId": "pro-monthly"}
    [item] = created["items"]["data"]
    assert set(item) == keys("subscription_item") and set(item["price"]) == keys("price")
    assert item["quantity"] == 2 and item["price"]["unit_amount"] == 1500
    assert item["price"]["recurring"]["interval"] == "month" and item["price"]["recurring"]["interval_count"] == 1
    assert (item["current_period_start"], item["current_period_end"]) == (start, ts(at(2028, 2, 29)))
    assert "current_period_end" not in created  # on the items since 2025-03-31.basil

    assert set(paid) == keys("invoice")
    assert (paid["status"], paid["billing_reason"], paid["amount_paid"], paid["currency"]) == (
        "paid", "subscription_create", 3000, "usd")
    assert paid["parent"]["type"] == "subscription_details"
    assert paid["parent"]["subscription_details"]["subscription"] == subscription_id
    assert paid["parent"]["subscription_details"]["metadata"] == created["metadata"]
    [line] = paid["lines"]["data"]
    assert set(line) == keys("line_item")
    assert line["period"] == {"start": start, "end": ts(at(2028, 2, 29))} and line["amount"] == 3000
    assert line["parent"]["subscription_item_details"]["subscription"] == subscription_id
    assert fake.subscription(subscription_id)["latest_invoice"] == paid["id"]
    assert fake.invoices_of(subscription_id) == [paid]


def test_billing_portal_session(fake: FakeStripe, client: stripe.StripeClient) -> None:
    customer = customer_for(client)

    portal = client.v1.billing_portal.sessions.create(
        params={"customer": customer, "return_url": "https://app.example/account"})

    assert set(fake.portal_sessions[str(portal.id)]) == keys("billing_portal.session")
    assert portal.object == "billing_portal.session" and portal.customer == customer and portal.url
    with pytest.raises(stripe.InvalidRequestError) as refused:
        client.v1.billing_portal.sessions.create(params={"customer": "cus_nobody"})
    assert refused.value.code == "resource_missing"


# ---------------------------------------------------------------- periods, renewals, failures, cancellation


def test_renewals_advance_by_calendar_month_from_the_anchor(fake: FakeStripe, client: stripe.StripeClient) -> None:
    subscription_id, _ = subscribed(fake, client)

    ends = []
    for _ in range(3):
        paid, updated = fake.renew(subscription_id)
        assert (paid["type"], updated["type"]) == ("invoice.paid", "customer.subscription.updated")
        invoice = paid["data"]["object"]
        assert invoice["billing_reason"] == "subscription_cycle" and invoice["status"] == "paid"
        [line] = invoice["lines"]["data"]
        item = updated["data"]["object"]["items"]["data"][0]
        assert line["period"] == {"start": item["current_period_start"], "end": item["current_period_end"]}
        # the invoice's own period is the one that just ended
        assert invoice["period_end"] == line["period"]["start"]
        previous = updated["data"]["previous_attributes"]["items"]["data"][0]
        assert previous["current_period_end"] == item["current_period_start"]
        ends.append(line["period"]["end"])

    # Jan 31 -> Feb 29 (2028 is a leap year) -> Mar 31 -> Apr 30 -> May 31: each from the anchor day
    assert ends == [ts(at(2028, 3, 31)), ts(at(2028, 4, 30)), ts(at(2028, 5, 31))]
    assert [i["billing_reason"] for i in fake.invoices_of(subscription_id)] == [
        "subscription_create"] + ["subscription_cycle"] * 3


def test_a_common_year_february_has_28_days(clock: Clock, fake: FakeStripe, client: stripe.StripeClient) -> None:
    clock.now = at(2027, 1, 31).timestamp()

    subscription_id, _ = subscribed(fake, client)

    item = fake.subscription(subscription_id)["items"]["data"][0]
    assert item["current_period_end"] == ts(at(2027, 2, 28))
    paid, _updated = fake.renew(subscription_id)
    assert paid["data"]["object"]["lines"]["data"][0]["period"]["end"] == ts(at(2027, 3, 31))


@pytest.mark.parametrize(("interval", "count", "first_end"), [
    ("day", 1, at(2028, 2, 1)), ("week", 1, at(2028, 2, 7)), ("week", 2, at(2028, 2, 14)),
    ("month", 3, at(2028, 4, 30)), ("month", 6, at(2028, 7, 31)), ("year", 1, at(2029, 1, 31)),
])
def test_every_cycle_of_the_spec_bills_its_period(
        fake: FakeStripe, client: stripe.StripeClient, interval: str, count: int, first_end: datetime) -> None:
    subscription_id, events = subscribed(fake, client, interval=interval, count=count)

    assert events[2]["data"]["object"]["lines"]["data"][0]["period"]["end"] == ts(first_end)
    assert fake.subscription(subscription_id)["items"]["data"][0]["price"]["recurring"] == {
        "interval": interval, "interval_count": count, "meter": None, "trial_period_days": None,
        "usage_type": "licensed"}


def test_calendar_arithmetic() -> None:
    assert add_months(ts(at(2028, 1, 31)), 1) == ts(at(2028, 2, 29))
    assert add_months(ts(at(2027, 12, 31)), 2) == ts(at(2028, 2, 29))
    assert add_months(ts(at(2028, 2, 29)), 12) == ts(at(2029, 2, 28))
    assert period_boundary(ts(at(2028, 1, 31)), "month", 1, 2) == ts(at(2028, 3, 31))


def test_a_failed_renewal_leaves_the_invoice_open_and_the_subscription_past_due(
        fake: FakeStripe, client: stripe.StripeClient) -> None:
    subscription_id, _ = subscribed(fake, client)

    failed, updated = fake.fail_renewal(subscription_id)

    assert (failed["type"], updated["type"]) == ("invoice.payment_failed", "customer.subscription.updated")
    invoice = failed["data"]["object"]
    assert (invoice["status"], invoice["attempted"], invoice["amount_paid"], invoice["amount_remaining"]) == (
        "open", True, 0, 1500)
    assert invoice["billing_reason"] == "subscription_cycle" and invoice["next_payment_attempt"] is not None
    assert invoice["parent"]["subscription_details"]["subscription"] == subscription_id
    assert updated["data"]["object"]["status"] == "past_due"
    assert updated["data"]["previous_attributes"]["status"] == "active"

    [retry_failed] = fake.fail_renewal(subscription_id)  # Stripe retries; that attempt fails too
    assert retry_failed["data"]["object"]["attempt_count"] == 2

    paid, recovered = fake.renew(subscription_id)  # the next retry succeeds: the same invoice, paid
    assert paid["data"]["object"]["id"] == invoice["id"] and paid["data"]["object"]["status"] == "paid"
    assert recovered["data"]["object"]["status"] == "active"
    assert len(fake.invoices_of(subscription_id)) == 2


def test_cancel_at_once(fake: FakeStripe, client: stripe.StripeClient, clock: Clock) -> None:
    subscription_id, _ = subscribed(fake, client)

    [deleted] = fake.cancel(subscription_id)

    assert deleted["type"] == "customer.subscription.deleted"
    assert deleted["data"]["object"]["status"] == "canceled"
    assert deleted["data"]["object"]["ended_at"] == int(clock.now)
    with pytest.raises(ValueError, match="canceled"):
        fake.renew(subscription_id)


def test_cancel_at_period_end_ends_it_instead_of_renewing(fake: FakeStripe, client: stripe.StripeClient) -> None:
    subscription_id, _ = subscribed(fake, client)

    [updated] = fake.cancel(subscription_id, at_period_end=True)

    assert updated["type"] == "customer.subscription.updated"
    subscription = updated["data"]["object"]
    assert (subscription["status"], subscription["cancel_at_period_end"]) == ("active", True)
    assert subscription["cancel_at"] == subscription["items"]["data"][0]["current_period_end"]
    assert updated["data"]["previous_attributes"]["cancel_at_period_end"] is False
    [deleted] = fake.renew(subscription_id)
    assert deleted["type"] == "customer.subscription.deleted"
    assert deleted["data"]["object"]["ended_at"] == subscription["cancel_at"]
    assert len(fake.invoices_of(subscription_id)) == 1  # no renewal was billed


# ---------------------------------------------------------------- over HTTP, and the CLI


def test_control_routes_answer_the_events_and_are_not_api_calls(fake: FakeStripe, client: stripe.StripeClient) -> None:
    session = client.v1.checkout.sessions.create(params=payment_params(customer_for(client)))
    calls = len(fake.requests)

    refused = requests.post(f"{fake.base_url}/_fake/checkout/sessions/{session.id}/complete", timeout=10)
    answer = form_post(fake, f"/_fake/checkout/sessions/{session.id}/complete", {})
    missing = form_post(fake, "/_fake/subscriptions/sub_nobody/renew", {})

    assert refused.status_code == 401
    assert answer.status_code == 200
    assert [e["type"] for e in answer.json()["data"]] == ["checkout.session.completed", "payment_intent.succeeded"]
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "resource_missing"
    assert len(fake.requests) == calls


class _Webhooks:
    """Stands in for the service's POST /webhooks/stripe: records what it is sent."""

    def __init__(self) -> None:
        self.deliveries: list[tuple[bytes, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.deliveries.append((body, self.headers["Stripe-Signature"]))
                answer = b'{"received": true}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"


def test_the_cli_plays_the_customer_and_delivers_signed_webhooks(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    for variable in cli._table_variables().values():
        monkeypatch.delenv(variable, raising=False)
    webhooks = _Webhooks()
    with FakeStripe(api_key=server.LOCAL_STRIPE_KEY) as dev_fake:
        server.DevState(api_url=webhooks.url, dynamodb_endpoint="http://127.0.0.1:9", engine="moto", tables={},
                        stripe_api_base=dev_fake.base_url, stripe_mode="local").write(tmp_path)
        sdk = stripe.StripeClient(server.LOCAL_STRIPE_KEY, base_addresses={"api": dev_fake.base_url},
                                  max_network_retries=0)
        session = sdk.v1.checkout.sessions.create(params=subscription_params(customer_for(sdk)))
        where = ["--data-dir", str(tmp_path)]

        assert cli.main(["checkout-complete", str(session.id), *where]) == 0
        subscription_id = dev_fake.session(str(session.id))["subscription"]
        assert cli.main(["renew", subscription_id, *where]) == 0
        assert cli.main(["fail-renewal", subscription_id, *where]) == 0
        assert cli.main(["cancel", subscription_id, "--at-period-end", *where]) == 0
        assert cli.main(["renew", "sub_nobody", *where]) == 2
        try:
            webhooks.server.shutdown()
        finally:
            webhooks.server.server_close()

    out, err = capsys.readouterr()
    secret = server.local_webhook_secret(tmp_path)
    delivered = [stripe.Webhook.construct_event(body.decode(), signature, secret)
                 for body, signature in webhooks.deliveries]  # raises on a bad signature
    assert [e["type"] for e in delivered] == [
        "checkout.session.completed", "customer.subscription.created", "invoice.paid",
        "invoice.paid", "customer.subscription.updated",
        "invoice.payment_failed", "customer.subscription.updated",
        "customer.subscription.updated",
    ]
    assert json.loads(webhooks.deliveries[-1][0])["data"]["object"]["cancel_at_period_end"] is True
    assert f"customer.subscription.created {subscription_id} -> 200" in out
    assert "No such subscription: 'sub_nobody'" in err
