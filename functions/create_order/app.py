"""POST /orders, GET /orders/{orderId} (SPEC 2.3), POST /checkout and POST /billing-portal (SPEC 2.10)."""

from user_credits.api import checkout, orders
from user_credits.api.app import lambda_entry

handler = lambda_entry(orders.router, checkout.router)
