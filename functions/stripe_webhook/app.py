"""POST /webhooks/stripe: Stripe's word on payments and refunds, applied exactly once (SPEC 2.4, 2.8)."""

from user_credits.api.app import lambda_entry
from user_credits.api.webhooks import router

handler = lambda_entry(router)
