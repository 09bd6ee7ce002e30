"""Path and query parameters shared by the routers, held to SPEC 3's id rules."""

from __future__ import annotations

from typing import Annotated

from aws_lambda_powertools.event_handler.openapi.params import Path, Query

from user_credits.api.schemas import ID_PATTERN

IdPath = Annotated[str, Path(pattern=ID_PATTERN, min_length=1, max_length=128)]
GroupQuery = Annotated[str | None, Query(pattern=ID_PATTERN, min_length=1, max_length=128)]
