"""Path and query parameters shared by the routers, held to SPEC 3's id rules."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Header, Path, Query

from user_credits.api.schemas import HOLD_ID_PATTERN, ID_PATTERN

IdPath = Annotated[str, Path(pattern=ID_PATTERN, min_length=1, max_length=128)]
HoldIdPath = Annotated[str, Path(
    pattern=HOLD_ID_PATTERN, min_length=1, max_length=200,
    description="The `holdId` the hold was answered with (opaque: pass it back as it came).",
)]
GroupQuery = Annotated[str | None, Query(pattern=ID_PATTERN, min_length=1, max_length=128)]
# SPEC 3: honoured on the routes that declare it; a repeat with the same key answers the first response.
IdempotencyKeyHeader = Annotated[str | None, Header(
    alias="Idempotency-Key", pattern=ID_PATTERN, min_length=1, max_length=128,
    description="Makes the call safe to retry: a repeat with the same key (and body) answers the first "
                "response and changes nothing more; the same key with another body is refused (422).",
)]
