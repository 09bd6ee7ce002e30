"""template.yaml as the single source of truth for tables, function environments and routes."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from user_credits_dev.lambda_events import route_matches

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_ROOT / "template.yaml"

_TABLE_ENV = {
    "OffersTable": "OFFERS_TABLE",
    "AccountsTable": "ACCOUNTS_TABLE",
    "LedgerTable": "LEDGER_TABLE",
    "IdempotencyTable": "IDEMPOTENCY_TABLE",
}


class _CfnLoader(yaml.SafeLoader):
    """Reads CloudFormation short forms (!Ref X -> {"Ref": X}, !GetAtt a.b -> {"Fn::GetAtt": [a, b]})."""


def _construct(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> Any:
    name = "Ref" if suffix == "Ref" else f"Fn::{suffix}"
    if isinstance(node, yaml.ScalarNode):
        value: Any = loader.construct_scalar(node)
        if suffix == "GetAtt":
            value = str(value).split(".", 1)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    return {name: value}


_CfnLoader.add_multi_constructor("!", _construct)


@cache
def load_template(path: Path = TEMPLATE_PATH) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        data: dict[str, Any] = yaml.load(handle, Loader=_CfnLoader)
    return data


def resources(kind: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in load_template()["Resources"].items() if v["Type"] == kind}


def table_names(prefix: str) -> dict[str, str]:
    """A physical name per table resource, e.g. {"OffersTable": "<prefix>-OffersTable"}."""
    return {logical: f"{prefix}-{logical}" for logical in resources("AWS::DynamoDB::Table")}


def create_table_requests(prefix: str) -> list[dict[str, Any]]:
    """CreateTable requests built from the template's table properties (keys, GSIs, billing)."""
    requests = []
    for logical, resource in resources("AWS::DynamoDB::Table").items():
        props = resource["Properties"]
        request: dict[str, Any] = {
            "TableName": f"{prefix}-{logical}",
            "AttributeDefinitions": props["AttributeDefinitions"],
            "KeySchema": props["KeySchema"],
            "BillingMode": props.get("BillingMode", "PAY_PER_REQUEST"),
        }
        if props.get("GlobalSecondaryIndexes"):
            request["GlobalSecondaryIndexes"] = props["GlobalSecondaryIndexes"]
        if props.get("StreamSpecification"):
            request["StreamSpecification"] = {"StreamEnabled": True, **props["StreamSpecification"]}
        requests.append(request)
    return requests


def ttl_settings(prefix: str) -> list[tuple[str, str]]:
    out = []
    for logical, resource in resources("AWS::DynamoDB::Table").items():
        spec = resource["Properties"].get("TimeToLiveSpecification")
        if spec and spec.get("Enabled"):
            out.append((f"{prefix}-{logical}", spec["AttributeName"]))
    return out


def create_tables(client: Any, prefix: str) -> dict[str, str]:
    """Create every table of the template (skipping those that exist); returns logical -> name."""
    existing = set(client.list_tables().get("TableNames", []))
    for request in create_table_requests(prefix):
        if request["TableName"] not in existing:
            client.create_table(**request)
    for name, attribute in ttl_settings(prefix):
        # TTL already set, or an engine without TTL: only the expiry of old keys is affected.
        with contextlib.suppress(client.exceptions.ClientError):
            client.update_time_to_live(
                TableName=name, TimeToLiveSpecification={"Enabled": True, "AttributeName": attribute}
            )
    return table_names(prefix)


@dataclass(frozen=True)
class FunctionSpec:
    logical_id: str
    code_uri: Path
    handler: str
    environment: dict[str, str]
    routes: tuple[tuple[str, str, str], ...]  # (method, path, authorizer)
    schedule: str | None
    # A DynamoDB stream event: the table (logical id) whose stream it reads, and its BatchSize.
    stream: str | None = None
    batch_size: int = 100


def _resolve(value: Any, tables: Mapping[str, str]) -> str:
    if isinstance(value, dict) and "Ref" in value:
        return tables.get(value["Ref"], value["Ref"])
    return str(value)


def functions(tables: Mapping[str, str]) -> list[FunctionSpec]:
    """Each function with its environment (table !Refs resolved to `tables`) and its HTTP routes."""
    specs = []
    shared = _variables(load_template().get("Globals", {}).get("Function", {}))
    for logical, resource in resources("AWS::Serverless::Function").items():
        props = resource["Properties"]
        # As SAM deploys it: the Globals' variables, with the function's own added over them.
        env = {k: _resolve(v, tables) for k, v in {**shared, **_variables(props)}.items()}
        routes = []
        schedule = stream = None
        batch_size = 100
        for event in (props.get("Events") or {}).values():
            if event["Type"] == "HttpApi":
                p = event["Properties"]
                auth = (p.get("Auth") or {}).get("Authorizer", "UserJwt")
                routes.append((p["Method"].upper(), p["Path"], auth))
            elif event["Type"] in ("Schedule", "ScheduleV2"):
                schedule = str(event["Properties"].get("ScheduleExpression"))
            elif event["Type"] == "DynamoDB":
                stream = _stream_table(event["Properties"]["Stream"])
                batch_size = int(event["Properties"].get("BatchSize", 100))
        specs.append(
            FunctionSpec(
                logical_id=logical,
                code_uri=REPO_ROOT / props["CodeUri"],
                handler=props["Handler"],
                environment=env,
                routes=tuple(routes),
                schedule=schedule,
                stream=stream,
                batch_size=batch_size,
            )
        )
    return specs


def _variables(props: Mapping[str, Any]) -> dict[str, Any]:
    return dict((props.get("Environment") or {}).get("Variables") or {})


def _stream_table(value: Any) -> str:
    """The table of `!GetAtt T.StreamArn`."""
    target = value.get("Fn::GetAtt") if isinstance(value, dict) else None
    logical, attribute = target if isinstance(target, list) else str(target).split(".")
    if attribute != "StreamArn":
        raise ValueError(f"a stream given another way: {value!r}")
    return str(logical)


def stream_function(specs: list[FunctionSpec]) -> FunctionSpec | None:
    """The function on a table's stream (this template has at most one)."""
    return next((spec for spec in specs if spec.stream is not None), None)


def match_route(specs: list[FunctionSpec], method: str, path: str) -> tuple[FunctionSpec, str, str] | None:
    """(function, route path, authorizer) serving METHOD PATH, or None.

    Static routes are tried before templated ones, as API Gateway does.
    """
    table = sorted(
        ((spec, m, p, a) for spec in specs for (m, p, a) in spec.routes),
        key=lambda r: ("{" in r[2], r[2].count("{"), r[2], r[1]),
    )
    for spec, route_method, route_path, authorizer in table:
        if route_method in (method.upper(), "ANY") and route_matches(route_path, path) is not None:
            return spec, route_path, authorizer
    return None


def table_environment(tables: Mapping[str, str]) -> dict[str, str]:
    return {_TABLE_ENV[logical]: name for logical, name in tables.items() if logical in _TABLE_ENV}


_import_lock = threading.Lock()


def load_handler(spec: FunctionSpec) -> Any:
    """Import `app.handler` from the function's CodeUri folder under a unique module name."""
    with _import_lock:
        return _load_handler(spec)


def _load_handler(spec: FunctionSpec) -> Any:
    module_name, attr = spec.handler.rsplit(".", 1)
    file = spec.code_uri / f"{module_name}.py"
    unique = f"functions_{spec.code_uri.name}_{module_name}"

    if unique in sys.modules:
        return getattr(sys.modules[unique], attr)
    loader_spec = importlib.util.spec_from_file_location(unique, file)
    if loader_spec is None or loader_spec.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[unique] = module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        # A half-imported module must not be found by the next attempt.
        del sys.modules[unique]
        raise
    return getattr(module, attr)


def dynamodb_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_DYNAMODB")


@dataclass(frozen=True)
class CorsRules:
    """The HTTP API's CorsConfiguration, as template.yaml gives it when `AllowedOrigins` is set."""

    origins: tuple[str, ...]
    headers: tuple[str, ...]
    methods: tuple[str, ...]
    max_age: int

    def allows(self, origin: str | None) -> bool:
        return origin is not None and ("*" in self.origins or origin in self.origins)


def cors_rules(allowed_origins: str) -> CorsRules | None:
    """`allowed_origins` is the stack parameter (comma-separated; empty: CORS off, as in the template)."""
    origins = tuple(o.strip() for o in allowed_origins.split(",") if o.strip())
    if not origins:
        return None
    config = resources("AWS::Serverless::HttpApi")["HttpApi"]["Properties"]["CorsConfiguration"]
    # `!If [HasCors, {...}, !Ref AWS::NoValue]`: the configuration is the second item.
    rules = config["Fn::If"][1]
    return CorsRules(origins, tuple(rules["AllowHeaders"]), tuple(rules["AllowMethods"]), int(rules["MaxAge"]))
