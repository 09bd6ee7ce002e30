"""Every failure the service reports, as a named error with its one HTTP status and code.

This module is the one map from error to HTTP: `api.errors` turns any `CreditsError` into
`{"error": code, "message": text}` with `http_status`; nothing else picks a status for a failure.
"""

from __future__ import annotations

from typing import Any, ClassVar


class CreditsError(Exception):
    http_status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"
    # SPEC 3: a 5xx body never carries internal detail (secret names, endpoints). A server error answers
    # this fixed text instead of the message it was raised with, which only the log sees.
    plain_message: ClassVar[str] = "internal error"

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra

    def public_message(self) -> str:
        return self.message if self.http_status < 500 else self.plain_message

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.public_message(), **self.extra}


class ValidationFailed(CreditsError):
    http_status = 422
    code = "validation_error"


class MalformedJson(CreditsError):
    http_status = 400
    code = "validation_error"


class CurrencyNotSupported(CreditsError):
    http_status = 422
    code = "currency_not_supported"


class QuantityLimitExceeded(CreditsError):
    http_status = 422
    code = "quantity_limit_exceeded"


class Unauthorized(CreditsError):
    http_status = 401
    code = "unauthorized"


class Forbidden(CreditsError):
    http_status = 403
    code = "forbidden"


class PayloadTooLarge(CreditsError):
    http_status = 413
    code = "payload_too_large"


class UnsupportedMediaType(CreditsError):
    http_status = 415
    code = "unsupported_media_type"


class OfferNotFound(CreditsError):
    http_status = 404
    code = "offer_not_found"


class OrderNotFound(CreditsError):
    http_status = 404
    code = "order_not_found"


class RouteNotFound(CreditsError):
    http_status = 404
    code = "not_found"


class OfferLocked(CreditsError):
    http_status = 409
    code = "offer_locked"


class OfferInactive(CreditsError):
    http_status = 409
    code = "offer_inactive"


class InsufficientCredits(CreditsError):
    http_status = 402
    code = "insufficient_credits"


class CreditsExpired(CreditsError):
    http_status = 402
    code = "credits_expired"


class IdempotencyKeyReused(CreditsError):
    http_status = 422
    code = "idempotency_key_reused"


class PurchaseLimitReached(CreditsError):
    """The user already has `perUserLimit` orders of this offer pending, paid or partially refunded."""

    http_status = 409
    code = "purchase_limit_reached"


class CustomerNotFound(CreditsError):
    """POST /billing-portal before the user ever checked out: there is no Stripe Customer yet."""

    http_status = 404
    code = "customer_not_found"


class TooManyHolds(CreditsError):
    """The group has the most open holds it may have: settle or release one first."""

    http_status = 409
    code = "too_many_holds"


class HoldNotFound(CreditsError):
    http_status = 404
    code = "hold_not_found"


class HoldClosed(CreditsError):
    """The hold was settled or released by another call (a repeat of that same call replays it)."""

    http_status = 409
    code = "hold_closed"


class InvalidSignature(CreditsError):
    http_status = 400
    code = "invalid_signature"


class ServiceBusy(CreditsError):
    """Throttling or contention outlasted our retries: the caller should retry (503 + Retry-After)."""

    http_status = 503
    code = "service_unavailable"

    def public_message(self) -> str:
        # Always one of our own "retry shortly" texts: nothing internal to hide.
        return self.message


class PaymentProviderError(CreditsError):
    """Stripe failed or could not be reached; nothing was stored, the caller may retry."""

    http_status = 502
    code = "payment_provider_error"
    plain_message = "the payment provider failed; nothing was stored, retry later"


class ConfigurationError(CreditsError):
    http_status = 500
    code = "configuration_error"
