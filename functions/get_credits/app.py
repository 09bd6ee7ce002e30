"""GET /credits, /credits/ledger (user) and /users/{userId}/credits, /users/{userId}/ledger (service)."""

from user_credits.api.app import lambda_entry
from user_credits.api.credits import router, service_router

handler = lambda_entry(router, service_router)
