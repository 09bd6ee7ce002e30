"""Every answer the test suite gets is checked against openapi.json (SPEC 3: the published document
describes every route as it really answers; outside tests validate real answers against it).

The status must be documented for the operation, the body must be valid against the documented
schema (which forbids fields it does not name), and the content type must be the documented one.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jsonschema

from user_credits_dev import template as tpl


@cache
def document() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((tpl.REPO_ROOT / "openapi.json").read_text(encoding="utf-8"))
    return loaded


def check_answer(method: str, route_path: str, status: int, body: Any, headers: dict[str, str]) -> None:
    operation = document()["paths"][route_path][method.lower()]
    documented = operation["responses"]
    assert str(status) in documented, (
        f"{method} {route_path} answered {status}, which openapi.json does not document "
        f"(it documents {sorted(documented)}): {body}")
    content = documented[str(status)].get("content", {})
    media = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
    assert media.split(";")[0].strip() in content, f"{method} {route_path} {status} answered {media!r}"
    schema = content[media.split(";")[0].strip()]["schema"]
    # The component references resolve against a root that carries the document's components.
    rooted = {**schema, "components": document()["components"]}
    errors = sorted(jsonschema.Draft202012Validator(rooted).iter_errors(body), key=lambda e: list(e.path))
    assert not errors, f"{method} {route_path} {status}: the body does not match openapi.json: " + "; ".join(
        f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}" for e in errors[:5])
