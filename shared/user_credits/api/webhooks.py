"""POST /webhooks/stripe: authenticated by the Stripe signature, not by API Gateway."""

from __future__ import annotations

from aws_lambda_powertools.event_handler import Response
from aws_lambda_powertools.event_handler.api_gateway import Router

from user_credits.api import contract as c
from user_credits.api.context import header
from user_credits.api.responses import json_response
from user_credits.logic import stripe_events

router = Router()


@router.post("/webhooks/stripe", responses=c.answers(200, c.Received, "Received", 400, 413))
def stripe_webhook() -> Response[str]:
    event = router.current_event
    # The signature covers the exact bytes Stripe sent, so the body is read raw, never re-serialized.
    payload = event.decoded_body or ""
    signature = header(event.headers, "stripe-signature")
    stripe_events.receive_stripe_webhook(payload, signature)
    return json_response(200, {"received": True})
