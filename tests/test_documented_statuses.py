"""Every status openapi.json documents for a route is one the route really gives (issue 15).

One case per (operation, documented status), each provoking that status through the handlers on
DynamoDB Local; every answer is also checked against the document (tests/contract.py). A status
documented without a way here to provoke it fails the test: the document may not promise what
the service never answers, nor forget what it does.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest
from botocore.exceptions import ClientError
from conftest import Reply, hook_dynamodb_clients
from contract import document

if TYPE_CHECKING:
    from stripe_fixtures import Shop

pytest_plugins = ["stripe_fixtures"]

OPERATIONS = [(method.upper(), path, int(status))
              for path, operations in document()["paths"].items()
              for method, operation in operations.items()
              for status in operation["responses"]]
USER_ROUTES = {"/offers", "/orders", "/orders/{orderId}", "/credits", "/credits/ledger", "/checkout",
               "/billing-portal", "/subscriptions"}
PAGES = {"successUrl": "https://shop.example/done", "cancelUrl": "https://shop.example/cart"}
HOLDS = "/users/{userId}/holds"
SETTLE = "/users/{userId}/holds/{holdId}/settle"
RELEASE = "/users/{userId}/holds/{holdId}/release"


@dataclass
class Case:
    shop: Shop
    method: str
    route: str
    ids: Any
    monkeypatch: pytest.MonkeyPatch

    def __post_init__(self) -> None:
        self.user = self.ids("u")
        self.group = self.ids("g")

    def path(self, **params: str) -> str:
        values = {"userId": self.user, "offerId": self.ids("offer"), "orderId": self.ids("order"),
                  "holdId": self.ids("hold"), **params}
        return self.route.format(**values)

    def call(self, body: Any = None, *, path: str | None = None, auth: bool = True, **kwargs: Any) -> Reply:
        who: dict[str, Any] = {}
        if auth:
            who = {"user": self.user} if self.route in USER_ROUTES else {"iam": True}
        if self.route == "/webhooks/stripe":
            who = {}
        return self.shop.service.call(self.method, path or self.path(), body, **who, **kwargs)

    def valid_body(self) -> Any:
        offer_id, _ = self.shop.offer(group=self.group, tokens=10, cycle="once", prices={"usd": 100})
        return {
            "/orders": {"offerId": offer_id},
            "/checkout": {"offerId": offer_id, **PAGES},
            "/billing-portal": {"returnUrl": "https://shop.example/account"},
            "/users/{userId}/consume": {"offerGroup": self.group, "tokens": 1},
            HOLDS: {"offerGroup": self.group, "tokens": 1},
            SETTLE: {"tokens": 1},
            RELEASE: {},
            "/admin/users/{userId}/grants": {"offerGroup": self.group, "tokens": 5},
            "/admin/offers/{offerId}": {"offerGroup": self.group, "tokens": 1, "cycle": "once",
                                        "prices": {"usd": 1}},
        }.get(self.route, {})

    def hold(self) -> str:
        """The id of a new hold of the case's user on its group (granted 5 tokens first)."""
        self.shop.service.call("POST", f"/admin/users/{self.user}/grants",
                               {"offerGroup": self.group, "tokens": 5}, iam=True)
        placed = self.shop.service.call("POST", f"/users/{self.user}/holds",
                                        {"offerGroup": self.group, "tokens": 1}, iam=True)
        assert placed.status == 201, (placed.status, placed.body)
        hold_id: str = placed.body["holdId"]
        return hold_id

    def customer(self) -> None:
        """The case's user checks out once, so it has a Stripe customer (what the portal needs)."""
        offer_id, _ = self.shop.offer(tokens=10, cycle="once", prices={"usd": 100})
        started = self.shop.service.call("POST", "/checkout", {"offerId": offer_id, **PAGES}, user=self.user)
        assert started.status == 201, (started.status, started.body)

    def failing_dynamodb(self, code: str) -> None:
        """Every DynamoDB call from now on fails with `code` (a throttle, or one nothing retries)."""
        def refuse(**_: Any) -> None:
            raise ClientError({"Error": {"Code": code, "Message": "simulated"}}, "Simulated")
        hook_dynamodb_clients(self.monkeypatch, self.shop.service, {"before-call.dynamodb": refuse})


def _success(case: Case) -> Reply:
    body = case.valid_body()
    if case.route == "/webhooks/stripe":
        order = case.shop.placed(case.user, body["offerId"]) if body else None
        return case.shop.pay(order) if order else case.shop.pay(case.shop.placed(case.user, case.shop.offer()[0]))
    if case.route == "/orders/{orderId}":
        order = case.shop.placed(case.user, case.shop.offer()[0])
        return case.call(path=f"/orders/{order['orderId']}")
    if case.route in ("/users/{userId}/consume", HOLDS):
        case.shop.service.call("POST", f"/admin/users/{case.user}/grants",
                               {"offerGroup": case.group, "tokens": 5}, iam=True)
    if case.route in (SETTLE, RELEASE):
        return case.call(body, path=case.path(holdId=case.hold()))
    if case.route == "/billing-portal":
        case.customer()
    if case.method == "PUT" and case.route == "/admin/offers/{offerId}":
        path = case.path()
        first = case.call(body, path=path)
        return first if first.status == 201 else case.call(body, path=path)
    return case.call(body if case.method != "GET" else None)


def _updated(case: Case) -> Reply:
    path = case.path()
    body = case.valid_body()
    assert case.call(body, path=path).status == 201
    return case.call(body, path=path)


def _bad_json(case: Case) -> Reply:
    if case.route == "/webhooks/stripe":
        return case.shop.deliver({"id": "evt_x", "type": "payment_intent.succeeded"}, header="t=1,v1=forged")
    return case.call(raw_body="{not json", headers={"Content-Type": "application/json"})


def _too_large(case: Case) -> Reply:
    return case.call(raw_body=json.dumps({"pad": "x" * (257 * 1024)}), headers={"Content-Type": "application/json"})


def _not_json(case: Case) -> Reply:
    return case.call(raw_body="tokens=1", headers={"Content-Type": "text/plain"})


def _invalid(case: Case) -> Reply:
    if case.method == "GET":
        if "{userId}" in case.route:
            return case.call(path=case.route.replace("{userId}", "not valid"))
        if case.route == "/orders/{orderId}":
            return case.call(path="/orders/has space")
        return case.call(query={"limit": "0", "tags": "a b"})
    return case.call({**case.valid_body(), "unknownField": 1})


def _no_user(case: Case) -> Reply:
    return case.call(case.valid_body() or None, auth=False)


def _short(case: Case) -> Reply:
    body = case.valid_body()
    if case.route == SETTLE:
        # Above the hold, the excess is consumed by the consumption rule: refused, the hold stays open.
        return case.call({"tokens": 10**6}, path=case.path(holdId=case.hold()))
    if case.route.endswith(("consume", "holds")):
        return case.call({**body, "tokens": 10**6})
    return case.call({**body, "tokens": -10**6})


def _missing(case: Case) -> Reply:
    if case.route in ("/orders", "/checkout"):
        return case.call({**case.valid_body(), "offerId": case.ids("no-such-offer")})
    if case.route == "/billing-portal":
        return case.call(case.valid_body())  # no checkout yet: no customer
    if case.route in (SETTLE, RELEASE):
        return case.call(case.valid_body())  # a hold id that was never answered
    return case.call()


def _conflict(case: Case) -> Reply:
    if case.route == HOLDS:
        return _too_many_holds(case)
    return _closed(case) if case.route in (SETTLE, RELEASE) else _inactive(case)


def _too_many_holds(case: Case) -> Reply:
    from user_credits.store.holds import MAX_OPEN

    case.shop.service.call("POST", f"/admin/users/{case.user}/grants",
                           {"offerGroup": case.group, "tokens": MAX_OPEN + 1}, iam=True)
    for _ in range(MAX_OPEN):
        assert case.call(case.valid_body()).status == 201
    return case.call(case.valid_body())


def _inactive(case: Case) -> Reply:
    offer_id, _ = case.shop.offer(active=False)
    return case.call({**case.valid_body(), "offerId": offer_id})


def _closed(case: Case) -> Reply:
    """A settle after a release, or a release after a settle: 409 hold_closed."""
    hold_id = case.hold()
    other, body = (RELEASE, {}) if case.route == SETTLE else (SETTLE, {"tokens": 1})
    closing = case.shop.service.call("POST", other.format(userId=case.user, holdId=hold_id), body, iam=True)
    assert closing.status == 200, (closing.status, closing.body)
    return case.call(case.valid_body(), path=case.path(holdId=hold_id))


def _stripe_down(case: Case) -> Reply:
    body = case.valid_body()
    if case.route == "/billing-portal":
        case.customer()
    case.shop.service.setenv("STRIPE_API_KEY", "sk_test_not_the_fakes_key")
    return case.call(body)


def _dynamodb(code: str) -> Callable[[Case], Reply]:
    def provoke(case: Case) -> Reply:
        body = case.valid_body()
        if case.route == "/webhooks/stripe":
            order = case.shop.placed(case.user, body["offerId"] if body else case.shop.offer()[0])
            case.failing_dynamodb(code)
            return case.shop.pay(order)
        # A hold id says which group it is in, so only a real one reaches DynamoDB.
        path = case.path(holdId=case.hold()) if case.route in (SETTLE, RELEASE) else None
        case.failing_dynamodb(code)
        return case.call(body if case.method != "GET" else None, path=path)
    return provoke


PROVOKERS: dict[int, Callable[[Case], Reply]] = {
    200: _success, 201: _success, 400: _bad_json, 401: _no_user, 402: _short, 403: _no_user, 404: _missing,
    409: _conflict, 413: _too_large, 415: _not_json, 422: _invalid, 500: _dynamodb("ValidationException"),
    502: _stripe_down, 503: _dynamodb("ProvisionedThroughputExceededException"),
}


@pytest.mark.parametrize(("method", "route", "status"), OPERATIONS, ids=[f"{m} {p} {s}" for m, p, s in OPERATIONS])
def test_each_documented_status_is_one_the_route_gives(
    local_shop: Shop, ids: Any, monkeypatch: pytest.MonkeyPatch, method: str, route: str, status: int,
) -> None:
    case = Case(local_shop, method, route, ids, monkeypatch)
    provoke = _updated if (method, route, status) == ("PUT", "/admin/offers/{offerId}", 200) else PROVOKERS[status]
    reply = provoke(case)
    assert reply.status == status, (reply.status, reply.body)
