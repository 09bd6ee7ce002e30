"""POST /users/{userId}/holds, .../holds/{holdId}/settle, .../holds/{holdId}/release: reserve tokens
before the work, settle the real cost after (SPEC 2.9)."""

from user_credits.api.app import lambda_entry
from user_credits.api.holds import router

handler = lambda_entry(router)
