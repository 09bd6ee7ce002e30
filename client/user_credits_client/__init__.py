"""A Python client for user-credits, for a team's back-end (and for its users' JWT routes).

    from user_credits_client import CreditsClient, InsufficientCredits

    credits = CreditsClient("https://abc123.execute-api.eu-west-1.amazonaws.com/prod", region="eu-west-1")
    try:
        credits.consume("alice", "ai-tokens", 150)
    except InsufficientCredits as refusal:
        print("only", refusal.balance, "left")

Service routes (`/admin/*`, `/users/*`) are signed with AWS SigV4 for `execute-api` through botocore's
signer, with credentials from botocore's default chain (environment, profile, role): no keys in code.
User routes send the user's JWT (`user_token=`). Every mutating call carries an `Idempotency-Key` (yours,
or a fresh one), kept across the client's own retries, so a retry never applies a call twice; a hold's
settle and release need none, since the same call again answers its first outcome. A 503 is retried
after its `Retry-After`. The service's errors arrive as exceptions named after their code.

    hold = credits.hold("alice", "ai-tokens", 500)      # before the model call
    credits.settle("alice", hold.hold_id, 320)           # after it: 180 go back
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.session import Session

__all__ = [
    "ClosedHold", "Consumed", "CreditsClient", "CreditsError", "CreditsExpired", "Forbidden", "Granted", "Held",
    "HoldClosed", "HoldNotFound", "IdempotencyKeyReused", "InsufficientCredits", "LedgerEntry", "NotFound",
    "OfferLocked", "ServiceUnavailable", "Unauthorized", "ValidationError",
]


# ---------------------------------------------------------------- errors


class CreditsError(Exception):
    """An error answer: `status`, the service's `code` and `message` (and the 402s' `balance`)."""

    def __init__(self, status: int, code: str, message: str, body: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.body = dict(body or {})
        self.balance: int | None = self.body.get("balance")


class ValidationError(CreditsError):
    """400/422: the request was refused before anything was written."""


class Unauthorized(CreditsError):
    """401: no valid user token."""


class Forbidden(CreditsError):
    """403: a service route called without a valid SigV4 signature."""


class InsufficientCredits(CreditsError):
    """402 insufficient_credits; `balance` says what there is."""


class CreditsExpired(CreditsError):
    """402 credits_expired: every lot of the group has expired."""


class NotFound(CreditsError):
    """404: no such offer, order or route (another user's order looks the same)."""


class HoldNotFound(NotFound):
    """404 hold_not_found: no such hold of this user (or it closed more than 24 hours ago)."""


class OfferLocked(CreditsError):
    """409: the offer is locked for this user, or inactive."""


class HoldClosed(CreditsError):
    """409 hold_closed: the hold was already settled or released by another call."""


class IdempotencyKeyReused(CreditsError):
    """422: this Idempotency-Key was used with another body."""


class ServiceUnavailable(CreditsError):
    """503 (after the client's retries), or another 5xx."""


_BY_CODE: dict[str, type[CreditsError]] = {
    "insufficient_credits": InsufficientCredits, "credits_expired": CreditsExpired,
    "idempotency_key_reused": IdempotencyKeyReused, "offer_locked": OfferLocked, "offer_inactive": OfferLocked,
    "hold_not_found": HoldNotFound, "hold_closed": HoldClosed,
}
_BY_STATUS: dict[int, type[CreditsError]] = {
    400: ValidationError, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: OfferLocked, 413: ValidationError,
    415: ValidationError, 422: ValidationError,
}


def _error(status: int, body: Any) -> CreditsError:
    body = body if isinstance(body, dict) else {}
    code, message = str(body.get("error", "http_error")), str(body.get("message", ""))
    kind = _BY_CODE.get(code) or _BY_STATUS.get(status) or (ServiceUnavailable if status >= 500 else CreditsError)
    return kind(status, code, message, body)


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class Consumed:
    user_id: str
    offer_group: str
    consumed: int
    balance: int
    expires_at: str | None


@dataclass(frozen=True)
class Granted:
    user_id: str
    offer_group: str
    balance: int
    expires_at: str | None
    lot_id: str | None


@dataclass(frozen=True)
class Held:
    hold_id: str
    user_id: str
    offer_group: str
    tokens: int
    balance: int
    # When the hold is released by itself unless settled (not the group's expiry).
    expires_at: str


@dataclass(frozen=True)
class ClosedHold:
    """What a settle or release ended with: `settled` tokens spent, `released` given back."""

    hold_id: str
    settled: int
    released: int
    balance: int
    status: str  # "settled" or "released"


def _closure(got: Mapping[str, Any]) -> ClosedHold:
    return ClosedHold(got["holdId"], got["settled"], got["released"], got["balance"], got["status"])


@dataclass(frozen=True)
class Lot:
    lot_id: str
    source: str
    granted: int
    remaining: int
    starts_at: str
    expires_at: str | None
    priority: int
    order_id: str | None = None


@dataclass(frozen=True)
class Group:
    offer_group: str
    balance: int
    expires_at: str | None
    lots: tuple[Lot, ...]


@dataclass(frozen=True)
class Credits:
    user_id: str
    groups: dict[str, Group]
    orders: tuple[dict[str, Any], ...]

    def balance(self, offer_group: str) -> int:
        group = self.groups.get(offer_group)
        return group.balance if group is not None else 0


@dataclass(frozen=True)
class LedgerEntry:
    offer_group: str
    delta: int
    balance_after: int
    reason: str
    seq: int
    at: str
    lot_id: str | None = None
    order_id: str | None = None
    idempotency_key: str | None = None
    shortfall: int | None = None
    note: str | None = None
    hold_id: str | None = None


def _credits(body: Mapping[str, Any]) -> Credits:
    groups = {
        g["offerGroup"]: Group(g["offerGroup"], g["balance"], g["expiresAt"], tuple(
            Lot(lot["lotId"], lot["source"], lot["granted"], lot["remaining"], lot["startsAt"], lot["expiresAt"],
                lot["priority"], lot.get("orderId")) for lot in g.get("lots", [])))
        for g in body["groups"]
    }
    return Credits(body["userId"], groups, tuple(body["orders"]))


def _entry(item: Mapping[str, Any]) -> LedgerEntry:
    return LedgerEntry(item["offerGroup"], item["delta"], item["balanceAfter"], item["reason"], item["seq"],
                       item["at"], item.get("lotId"), item.get("orderId"), item.get("idempotencyKey"),
                       item.get("shortfall"), item.get("note"), item.get("holdId"))


# ---------------------------------------------------------------- the client


@dataclass
class CreditsClient:
    """`base_url` is the stack's `ApiUrl` output (or `http://127.0.0.1:3000` for `make dev`)."""

    base_url: str
    region: str | None = None
    user_token: str | None = None
    credentials: Credentials | None = None
    timeout: float = 10.0
    # Attempts per call, for 503s and dropped connections; each waits Retry-After (or a backoff).
    attempts: int = 4
    _session: Session = field(default_factory=Session, repr=False)

    # -- service routes (SigV4)

    def consume(self, user_id: str, offer_group: str, tokens: int, *, max_overdraft: int = 0,
                idempotency_key: str | None = None) -> Consumed:
        body = {"offerGroup": offer_group, "tokens": tokens, "maxOverdraft": max_overdraft}
        got = self._call("POST", f"/users/{_q(user_id)}/consume", body, key=idempotency_key or _new_key())
        return Consumed(got["userId"], got["offerGroup"], got["consumed"], got["balance"], got["expiresAt"])

    def grant(self, user_id: str, offer_group: str, tokens: int, *, expires_at: str | None = None,
              reason: str | None = None, priority: int | None = None, idempotency_key: str | None = None) -> Granted:
        body: dict[str, Any] = {"offerGroup": offer_group, "tokens": tokens}
        optional = {"expiresAt": expires_at, "reason": reason, "priority": priority}
        body.update({k: v for k, v in optional.items() if v is not None})
        got = self._call("POST", f"/admin/users/{_q(user_id)}/grants", body, key=idempotency_key or _new_key())
        return Granted(got["userId"], got["offerGroup"], got["balance"], got["expiresAt"], got["lotId"])

    def hold(self, user_id: str, offer_group: str, tokens: int, *, max_overdraft: int = 0,
             ttl_seconds: int | None = None, idempotency_key: str | None = None) -> Held:
        """Reserve `tokens` now (refused like a consume); settle or release the hold before `expires_at`."""
        body: dict[str, Any] = {"offerGroup": offer_group, "tokens": tokens, "maxOverdraft": max_overdraft}
        if ttl_seconds is not None:
            body["ttlSeconds"] = ttl_seconds
        got = self._call("POST", f"/users/{_q(user_id)}/holds", body, key=idempotency_key or _new_key())
        return Held(got["holdId"], got["userId"], got["offerGroup"], got["tokens"], got["balance"], got["expiresAt"])

    def settle(self, user_id: str, hold_id: str, tokens: int, *, max_overdraft: int = 0) -> ClosedHold:
        """Close the hold at the real cost `tokens`: the rest goes back; an excess is consumed (402 keeps the
        hold open)."""
        body = {"tokens": tokens, "maxOverdraft": max_overdraft}
        return _closure(self._call("POST", f"/users/{_q(user_id)}/holds/{_q(hold_id)}/settle", body))

    def release(self, user_id: str, hold_id: str) -> ClosedHold:
        """Give every held token back (the work did not happen)."""
        return _closure(self._call("POST", f"/users/{_q(user_id)}/holds/{_q(hold_id)}/release"))

    def credits(self, user_id: str | None = None) -> Credits:
        """A user's credits: the service route with `user_id`, else the token's user."""
        return _credits(self._call("GET", "/credits" if user_id is None else f"/users/{_q(user_id)}/credits"))

    def ledger(self, user_id: str | None = None, *, offer_group: str | None = None,
               page_size: int = 100) -> Iterator[LedgerEntry]:
        """Every entry, newest first, page after page."""
        path = "/credits/ledger" if user_id is None else f"/users/{_q(user_id)}/ledger"
        cursor: str | None = None
        while True:
            query = {"limit": str(page_size), "offerGroup": offer_group, "cursor": cursor}
            page = self._call("GET", path, query={k: v for k, v in query.items() if v is not None})
            yield from (_entry(item) for item in page["items"])
            cursor = page["nextCursor"]
            if cursor is None:
                return

    def put_offer(self, offer_id: str, offer: Mapping[str, Any]) -> dict[str, Any]:
        got: dict[str, Any] = self._call("PUT", f"/admin/offers/{_q(offer_id)}", dict(offer))["offer"]
        return got

    def all_offers(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = self._call("GET", "/admin/offers")["offers"]
        return got

    # -- user routes (the user's JWT)

    def offers(self, tags: list[str] | None = None) -> list[dict[str, Any]]:
        query = {"tags": ",".join(tags)} if tags else None
        got: list[dict[str, Any]] = self._call("GET", "/offers", query=query)["offers"]
        return got

    def create_order(self, offer_id: str, *, quantity: int = 1, currency: str | None = None,
                     idempotency_key: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"offerId": offer_id, "quantity": quantity}
        if currency is not None:
            body["currency"] = currency
        got: dict[str, Any] = self._call("POST", "/orders", body, key=idempotency_key or _new_key())["order"]
        return got

    def order(self, order_id: str) -> dict[str, Any]:
        got: dict[str, Any] = self._call("GET", f"/orders/{_q(order_id)}")["order"]
        return got

    # -- transport

    def _call(self, method: str, path: str, body: Any = None, *, key: str | None = None,
              query: Mapping[str, str] | None = None) -> Any:
        url = self.base_url.rstrip("/") + path + ("?" + urllib.parse.urlencode(query) if query else "")
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Idempotency-Key"] = key
        for attempt in range(self.attempts):
            request_headers = self._authorize(method, url, data, path, dict(headers))
            try:
                status, payload, retry_after = self._send(method, url, data, request_headers)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                # Nothing is known to have happened; reads and PUT are safe to repeat, every other POST
                # carries its Idempotency-Key, the same on every try, and a hold's settle or release
                # repeated answers its first outcome.
                if attempt == self.attempts - 1:
                    raise
                time.sleep(min(2.0, 0.2 * 2**attempt))
                continue
            if status == 503 and attempt < self.attempts - 1:
                time.sleep(retry_after if retry_after is not None else min(2.0, 0.2 * 2**attempt))
                continue
            if status >= 400:
                raise _error(status, payload)
            return payload
        raise AssertionError("unreachable")  # the loop returns or raises

    def _send(self, method: str, url: str, data: bytes | None,
              headers: dict[str, str]) -> tuple[int, Any, float | None]:
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, json.loads(response.read() or b"null"), None
        except urllib.error.HTTPError as answer:
            raw = answer.read()
            try:
                payload = json.loads(raw) if raw else None
            except ValueError:
                payload = None
            retry = answer.headers.get("Retry-After")
            return answer.code, payload, float(retry) if retry and retry.isdigit() else None

    def _authorize(self, method: str, url: str, data: bytes | None, path: str,
                   headers: dict[str, str]) -> dict[str, str]:
        if path.startswith(("/admin/", "/users/")):
            credentials = self.credentials or self._session.get_credentials()
            if credentials is None:
                raise Forbidden(403, "forbidden", "no AWS credentials found to sign a service route")
            region = self.region or self._session.get_config_variable("region") or "us-east-1"
            signed = AWSRequest(method=method, url=url, data=data, headers=headers)
            SigV4Auth(credentials, "execute-api", region).add_auth(signed)
            return dict(signed.headers.items())
        if self.user_token is not None:
            headers["Authorization"] = f"Bearer {self.user_token}"
        return headers


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _new_key() -> str:
    return f"client-{uuid.uuid4()}"
