"""The OpenAPI document in the repo is the one the routers generate, and it covers every route."""

from __future__ import annotations

import re

from user_credits_dev import openapi
from user_credits_dev import template as tpl


def test_openapi_json_in_the_repo_matches_the_routers() -> None:
    committed = openapi.OPENAPI_PATH.read_text(encoding="utf-8") if openapi.OPENAPI_PATH.exists() else ""
    assert committed == openapi.openapi_text(), (
        f"openapi.json is out of date with the routers; regenerate it with: {openapi.REGENERATE}"
    )


def test_every_route_of_the_template_is_documented() -> None:
    paths = openapi.openapi_document()["paths"]
    missing = [
        f"{method} {path}"
        for spec in tpl.functions(tpl.table_names("doc"))
        for method, path, _auth in spec.routes
        if method.lower() not in paths.get(path, {})
    ]
    assert not missing, f"routes of template.yaml without a documented operation: {missing}"


def test_each_operation_names_how_its_caller_authenticates() -> None:
    document = openapi.openapi_document()
    schemes = set(document["components"]["securitySchemes"])
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            (requirement,) = operation["security"]
            (scheme,) = requirement
            assert scheme in schemes, f"{method} {path}"
            expected = "awsIam" if re.match(r"^/(admin|users)/", path) else (
                "stripeSignature" if path == "/webhooks/stripe" else "userJwt")
            assert scheme == expected, f"{method} {path}"


def test_generating_the_document_leaves_each_router_with_its_function() -> None:
    routers = openapi.all_routers()
    before = [router.api_resolver for router in routers]
    openapi.openapi_document()
    assert [router.api_resolver for router in routers] == before
