"""GET /offers: the offers a user may buy, after unlocking and overriding (SPEC 2.2)."""

from user_credits.api.app import lambda_entry
from user_credits.api.offers import router

handler = lambda_entry(router)
