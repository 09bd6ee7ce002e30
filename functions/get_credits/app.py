"""GET /credits, /credits/ledger, /subscriptions (user) and their service routes under /users/{userId}/."""

from user_credits.api.app import lambda_entry
from user_credits.api.credits import router, service_router

handler = lambda_entry(router, service_router)
