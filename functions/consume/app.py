"""POST /users/{userId}/consume: spend tokens of a group (SPEC 2.5, 2.7, 2.8)."""

from user_credits.api.app import lambda_entry
from user_credits.api.consumption import router

handler = lambda_entry(router)
