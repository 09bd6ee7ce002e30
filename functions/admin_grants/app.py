"""POST /admin/users/{userId}/grants: promotional or corrective credits, idempotent with a key."""

from user_credits.api.app import lambda_entry
from user_credits.api.grants import router

handler = lambda_entry(router)
