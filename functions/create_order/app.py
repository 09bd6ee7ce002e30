"""POST /orders, GET /orders/{orderId}: buying an offer (SPEC 2.3) and reading one's own orders."""

from user_credits.api.app import lambda_entry
from user_credits.api.orders import router

handler = lambda_entry(router)
