"""`user-credits`: the dev server and the operator's commands, against the local service or AWS.

Commands that read or change balances call the functions of template.yaml in-process with the event
API Gateway would send for the matching service route (or the schedule's event), so they run exactly
the code the API runs: nothing here writes a balance itself.

Where the tables are:
- default: the running dev server (its <data dir>/dev.json names the DynamoDB endpoint);
- `--stack NAME`: the table names from the CloudFormation stack's outputs (OffersTableName, ...);
- `--tables-prefix P`: tables named `P-OffersTable`, ... (as the tests and the dev server name them);
- OFFERS_TABLE, ACCOUNTS_TABLE, LEDGER_TABLE, IDEMPOTENCY_TABLE already in the environment.
`--endpoint-url` points DynamoDB at another endpoint (e.g. a DynamoDB Local of your own).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import uuid
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from user_credits_dev import server, stripe_fake
from user_credits_dev import template as tpl
from user_credits_dev.lambda_events import http_api_event, scheduled_event


class CliError(Exception):
    pass


@dataclass
class Target:
    tables: dict[str, str]
    local: bool
    endpoint: str | None = None
    api_url: str | None = None
    event_bus: str | None = None
    data_dir: Path | None = None


def _stack_outputs(stack: str, region: str | None) -> dict[str, str]:
    import boto3

    client = boto3.client("cloudformation", region_name=region)
    description = client.describe_stacks(StackName=stack)["Stacks"][0]
    return {o["OutputKey"]: o["OutputValue"] for o in description.get("Outputs", [])}


def resolve_target(args: argparse.Namespace) -> Target:
    logical_tables = list(tpl.resources("AWS::DynamoDB::Table"))
    if args.stack:
        outputs = _stack_outputs(args.stack, args.region)
        missing = [t for t in logical_tables if f"{t}Name" not in outputs]
        if missing:
            raise CliError(f"stack {args.stack} has no output(s) {', '.join(t + 'Name' for t in missing)}")
        return Target({t: outputs[f"{t}Name"] for t in logical_tables}, False, args.endpoint_url,
                      event_bus=outputs.get("EventBusName"))
    if args.tables_prefix:
        return Target(tpl.table_names(args.tables_prefix), False, args.endpoint_url)
    by_env = {logical: os.environ.get(var) for logical, var in _table_variables().items()}
    if all(by_env.values()):
        return Target({k: v for k, v in by_env.items() if v}, False, args.endpoint_url)
    state = server.DevState.read(args.data_dir)
    if state is None:
        raise CliError(
            f"no dev server is running for {args.data_dir} (start it with `make dev`), "
            "or name AWS tables with --stack NAME / --tables-prefix PREFIX"
        )
    return Target(state.tables, True, state.dynamodb_endpoint, state.api_url, data_dir=args.data_dir)


def _table_variables() -> dict[str, str]:
    return tpl.table_environment({t: t for t in tpl.resources("AWS::DynamoDB::Table")})


def prepare(target: Target) -> server.FunctionHost:
    """The functions' environment for `target`, in this process; returns their host."""
    if target.local:
        assert target.endpoint is not None
        server.use_local_aws(target.endpoint)
        server.use_logging_events()
        if target.data_dir is not None:
            os.environ["STRIPE_WEBHOOK_SECRET"] = server.local_webhook_secret(target.data_dir)
            os.environ.setdefault("STRIPE_API_KEY", server.LOCAL_STRIPE_KEY)
    elif target.endpoint:
        os.environ["AWS_ENDPOINT_URL_DYNAMODB"] = target.endpoint
    overrides = {k: os.environ[k] for k in server._overridable(target.tables) if k in os.environ}
    if target.event_bus:
        overrides["EVENT_BUS_NAME"] = target.event_bus
    os.environ.update(server.function_environment(target.tables, overrides))
    from user_credits.config import load_settings
    from user_credits.store.models import bind_tables

    bind_tables(load_settings())
    # Against the dev server, this process delivers the stream records of its own writes at once (the
    # server may deliver them again: same entries, the same eventIds). In AWS, Lambda does it.
    return server.FunctionHost(target.tables, target.endpoint if target.local else None)


def call_route(host: server.FunctionHost, method: str, path: str, body: Any = None,
               query: Mapping[str, str] | None = None, idempotency_key: str | None = None) -> Any:
    """Invoke the function behind a service route as API Gateway would (IAM caller); exits on errors."""
    found = host.match(method, path)
    if found is None:
        raise CliError(f"template.yaml has no route {method} {path}")
    route_path, _auth, spec = found
    headers = {"idempotency-key": idempotency_key} if idempotency_key else None
    event = http_api_event(method, path, route_path=route_path, body=None if body is None else json.dumps(body),
                           headers=headers, query=query, iam=True)
    if query:
        event["rawQueryString"] = urlencode(query)
    try:
        result = host.invoke(spec, event)
    except server.FunctionNotBuilt as exc:
        raise CliError(str(exc)) from exc
    payload = json.loads(result.get("body") or "null")
    if int(result.get("statusCode", 500)) >= 300:
        raise CliError(f"{method} {path} -> {result.get('statusCode')}: {json.dumps(payload)}")
    return payload


def _print(value: Any) -> None:
    print(json.dumps(value, indent=2, default=str))


# ---------------------------------------------------------------- commands


def cmd_dev(args: argparse.Namespace) -> int:
    try:
        server.run_dev(
            port=args.port, data_dir=args.data_dir, catalog=None if args.no_catalog else args.catalog,
            engine=args.engine, sweep_every=args.sweep_every, allowed_origins=args.allowed_origins,
        )
    except server.DevServerError as exc:
        raise CliError(str(exc)) from exc
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    print(server.unsigned_token(args.user))
    return 0


def cmd_openapi(args: argparse.Namespace) -> int:
    from user_credits_dev import openapi

    text = openapi.openapi_text()
    if args.check:
        current = openapi.OPENAPI_PATH.read_text(encoding="utf-8") if openapi.OPENAPI_PATH.exists() else ""
        if current != text:
            print(f"{openapi.OPENAPI_PATH} is out of date; run: {openapi.REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if args.write:
        print(openapi.write_openapi())
    else:
        sys.stdout.write(text)
    return 0


def cmd_load_catalog(args: argparse.Namespace) -> int:
    from user_credits_dev.catalog_loader import CatalogFileError, load_catalog_file

    prepare(resolve_target(args))
    try:
        result = load_catalog_file(Path(args.file))
    except CatalogFileError as exc:
        raise CliError(str(exc)) from exc
    _print({"created": result.created, "updated": result.updated})
    return 0


def cmd_credits(args: argparse.Namespace) -> int:
    host = prepare(resolve_target(args))
    _print(call_route(host, "GET", f"/users/{args.user}/credits"))
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    host = prepare(resolve_target(args))
    query = {"limit": str(args.limit)}
    if args.group:
        query["offerGroup"] = args.group
    if args.cursor:
        query["cursor"] = args.cursor
    _print(call_route(host, "GET", f"/users/{args.user}/ledger", query=query))
    return 0


def cmd_grant(args: argparse.Namespace) -> int:
    host = prepare(resolve_target(args))
    body: dict[str, Any] = {"offerGroup": args.group, "tokens": args.tokens}
    if args.expires_at:
        body["expiresAt"] = args.expires_at
    if args.reason:
        body["reason"] = args.reason
    key = args.idempotency_key or f"cli-{uuid.uuid4()}"
    _print(call_route(host, "POST", f"/admin/users/{args.user}/grants", body, idempotency_key=key))
    return 0


def cmd_hold(args: argparse.Namespace) -> int:
    host = prepare(resolve_target(args))
    body: dict[str, Any] = {"offerGroup": args.group, "tokens": args.tokens, "maxOverdraft": args.max_overdraft}
    if args.ttl is not None:
        body["ttlSeconds"] = args.ttl
    key = args.idempotency_key or f"cli-{uuid.uuid4()}"
    _print(call_route(host, "POST", f"/users/{args.user}/holds", body, idempotency_key=key))
    return 0


def cmd_settle(args: argparse.Namespace) -> int:
    host = prepare(resolve_target(args))
    body = {"tokens": args.tokens, "maxOverdraft": args.max_overdraft}
    path = f"/users/{args.user}/holds/{args.hold}/settle"
    _print(call_route(host, "POST", path, body))
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    host = prepare(resolve_target(args))
    _print(call_route(host, "POST", f"/users/{args.user}/holds/{args.hold}/release"))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    host = prepare(resolve_target(args))
    scheduled = host.scheduled()
    if not scheduled:
        raise CliError("template.yaml has no scheduled function")
    for spec in scheduled:
        try:
            _print({spec.logical_id: host.invoke(spec, scheduled_event(), budget_ms=300_000)})
        except server.FunctionNotBuilt as exc:
            raise CliError(str(exc)) from exc
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """SPEC 1: for every (user, group), balance == sum of the ledger's deltas."""
    import dataclasses

    from user_credits.logic import invariants

    prepare(resolve_target(args))
    report = invariants.check_user(args.user) if args.user else invariants.check_all()
    _print({"ok": report.ok, "users": report.users, "groups": report.groups,
            "mismatches": [dataclasses.asdict(m) for m in report.mismatches],
            "unsoundBooks": report.unsound_books})
    return 0 if report.ok else 1


# ---------------------------------------------------------------- local payments


def find_order(target: Target, order_id: str) -> dict[str, Any]:
    """The order's item (any user), scanned from the local accounts table: local catalogs are small."""
    import boto3
    from boto3.dynamodb.types import TypeDeserializer

    client = boto3.client("dynamodb", endpoint_url=target.endpoint)
    kwargs: dict[str, Any] = {
        "TableName": target.tables["AccountsTable"], "ConsistentRead": True,
        "FilterExpression": "sk = :sk", "ExpressionAttributeValues": {":sk": {"S": f"ORDER#{order_id}"}},
    }
    while True:
        page = client.scan(**kwargs)
        if page["Items"]:
            deserializer = TypeDeserializer()
            return {k: deserializer.deserialize(v) for k, v in page["Items"][0].items()}
        if "LastEvaluatedKey" not in page:
            raise CliError(f"no order {order_id} in the local tables")
        kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _intent(target: Target, order: Mapping[str, Any], api_base: str) -> dict[str, Any]:
    """The order's PaymentIntent from the local fake; rebuilt from the order if the fake has forgotten it
    (it keeps intents in memory, so a dev server restart loses them)."""
    import requests

    intent_id = str(order["paymentIntentId"])
    with contextlib.suppress(requests.RequestException, ValueError):
        response = requests.get(f"{api_base}/v1/payment_intents/{intent_id}", timeout=10,
                                headers={"Authorization": f"Bearer {server.LOCAL_STRIPE_KEY}"})
        if response.ok:
            found: dict[str, Any] = response.json()
            return found
    return {"id": intent_id, "object": "payment_intent", "amount": int(order["amount"]),
            "currency": str(order["currency"]), "metadata": {"orderId": order["orderId"], "userId": order["userId"]},
            "status": "requires_payment_method"}


def payment_event(command: str, intent: Mapping[str, Any], order: Mapping[str, Any],
                  refund_amount: int | None = None) -> dict[str, Any]:
    """The Stripe event a simulated payment outcome produces (built by the Stripe fake's helpers)."""
    if command == "refund":
        amount = int(intent["amount"])
        already = int(order.get("amountRefunded") or 0)
        # Stripe's amount_refunded is cumulative: a second partial refund adds to the first.
        cumulative = min(amount, already + (amount - already if refund_amount is None else refund_amount))
        return stripe_fake.charge_refunded_event(intent, cumulative)
    kind = "payment_intent.succeeded" if command == "pay" else "payment_intent.payment_failed"
    return stripe_fake.payment_intent_event(intent, kind)


def cmd_payment(args: argparse.Namespace) -> int:
    import requests

    target = resolve_target(args)
    state = server.DevState.read(args.data_dir) if target.local else None
    if state is None or target.data_dir is None or not state.stripe_api_base or state.stripe_mode == "test":
        raise CliError("pay/fail/refund drive the local payment simulator of a running `make dev` "
                       "(with a real sk_test_ key, pay in Stripe's test mode instead)")
    assert target.endpoint is not None
    server.use_local_aws(target.endpoint)
    order = find_order(target, args.order_id)
    if not order.get("paymentIntentId"):
        raise CliError(f"order {args.order_id} has no PaymentIntent (status {order.get('status')})")
    if args.command == "refund" and args.amount is not None and args.amount < 1:
        raise CliError("--amount must be at least 1")
    event = payment_event(args.command, _intent(target, order, state.stripe_api_base), order,
                          getattr(args, "amount", None))
    payload, signature = stripe_fake.signed_delivery(event, server.local_webhook_secret(target.data_dir))
    response = requests.post(
        f"{state.api_url}/webhooks/stripe", data=payload, timeout=30,
        headers={"Content-Type": "application/json", "Stripe-Signature": signature},
    )
    print(f"{event['type']} for order {args.order_id} -> {response.status_code} {response.text}")
    return 0 if response.ok else 1


# ---------------------------------------------------------------- local subscriptions and Checkout

# What each command has the local Stripe fake do (its `/_fake/...` control routes, outside Stripe's API).
FAKE_ACTIONS = {
    "checkout-complete": ("checkout/sessions", "complete"),
    "renew": ("subscriptions", "renew"),
    "fail-renewal": ("subscriptions", "fail_renewal"),
    "cancel": ("subscriptions", "cancel"),
}


def fake_stripe_events(api_base: str, command: str, object_id: str, *, at_period_end: bool = False
                       ) -> list[dict[str, Any]]:
    """Have the dev server's Stripe fake play the customer (or time passing); the events Stripe would send."""
    import requests

    kind, action = FAKE_ACTIONS[command]
    try:
        response = requests.post(
            f"{api_base}/_fake/{kind}/{object_id}/{action}", timeout=30,
            data={"at_period_end": "true"} if at_period_end else {},
            headers={"Authorization": f"Bearer {server.LOCAL_STRIPE_KEY}"},
        )
        answer = response.json()
    except requests.RequestException as exc:
        raise CliError(f"the local Stripe at {api_base} did not answer: {exc}") from exc
    except ValueError as exc:
        raise CliError(f"the Stripe at {api_base} is not the local fake (it answered {response.status_code})") from exc
    error = answer.get("error") if isinstance(answer, dict) else None
    if error is not None:
        if error.get("code") == "resource_missing":
            raise CliError(f"{error.get('message')} in the local Stripe fake (it keeps objects in memory: a "
                           "restarted dev server has forgotten them)")
        if str(error.get("message", "")).startswith("Unrecognized request URL"):
            raise CliError(f"the Stripe at {api_base} is not the local fake (no {kind} {action})")
        raise CliError(f"{command} {object_id}: {error.get('message')}")
    events: list[dict[str, Any]] = answer["data"]
    return events


def cmd_fake_billing(args: argparse.Namespace) -> int:
    """checkout-complete / renew / fail-renewal / cancel: the fake does it, the service gets the webhooks."""
    import requests

    target = resolve_target(args)
    state = server.DevState.read(args.data_dir) if target.local else None
    if state is None or target.data_dir is None or not state.stripe_api_base or state.stripe_mode == "test":
        raise CliError(f"{args.command} drives the local Stripe fake of a running `make dev` (with a real "
                       "sk_test_ key, complete Checkout in Stripe's test mode and use test clocks instead)")
    events = fake_stripe_events(state.stripe_api_base, args.command, args.object_id,
                                at_period_end=getattr(args, "at_period_end", False))
    secret = server.local_webhook_secret(target.data_dir)
    delivered = True
    for event in events:
        payload, signature = stripe_fake.signed_delivery(event, secret)
        try:
            response = requests.post(
                f"{state.api_url}/webhooks/stripe", data=payload, timeout=30,
                headers={"Content-Type": "application/json", "Stripe-Signature": signature},
            )
        except requests.RequestException as exc:
            print(f"{event['type']} {event['data']['object'].get('id')} -> not delivered: {exc}")
            delivered = False
            continue
        print(f"{event['type']} {event['data']['object'].get('id')} -> {response.status_code} {response.text}")
        delivered = delivered and response.ok
    return 0 if delivered else 1


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="user-credits", description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--data-dir", type=Path, default=server.DATA_DIR, help="local data (default .local-data)")
    where.add_argument("--stack", help="AWS: read table names from this CloudFormation stack's outputs")
    where.add_argument("--tables-prefix", help="AWS: tables named PREFIX-OffersTable, ...")
    where.add_argument("--region", help="AWS region (default: your AWS configuration)")
    where.add_argument("--endpoint-url", help="DynamoDB endpoint for --stack/--tables-prefix/env tables")
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="run the service on 127.0.0.1 (DynamoDB Local, local Stripe)")
    dev.add_argument("--port", type=int, default=int(os.environ.get("PORT", server.DEFAULT_PORT)))
    dev.add_argument("--data-dir", type=Path, default=server.DATA_DIR)
    dev.add_argument("--catalog", type=Path, default=server.DEFAULT_CATALOG,
                     help="loaded when the offers table is empty (default catalog/example.yaml)")
    dev.add_argument("--no-catalog", action="store_true")
    dev.add_argument("--engine", choices=["auto", "dynamodb-local", "moto"], default="auto")
    dev.add_argument("--sweep-every", type=float, help="run the sweep every N seconds (default: template rate)")
    dev.add_argument("--allowed-origins", default=os.environ.get("ALLOWED_ORIGINS", ""),
                     help="browser origins allowed by CORS, comma-separated, as the stack parameter "
                          "AllowedOrigins (default: $ALLOWED_ORIGINS; empty: CORS off)")
    dev.set_defaults(func=cmd_dev)

    token = sub.add_parser("token", help="print an UNSIGNED JWT for USER (accepted by the dev server only)")
    token.add_argument("user")
    token.set_defaults(func=cmd_token)

    api_doc = sub.add_parser("openapi", help="print the OpenAPI document (--write: to openapi.json)")
    mode = api_doc.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true")
    mode.add_argument("--check", action="store_true", help="exit 1 when openapi.json is out of date")
    api_doc.set_defaults(func=cmd_openapi)

    load = sub.add_parser("load-catalog", parents=[where], help="validate a JSON/YAML catalog, then store it")
    load.add_argument("file")
    load.set_defaults(func=cmd_load_catalog)

    credits = sub.add_parser("credits", parents=[where], help="a user's balances and paid orders")
    credits.add_argument("user")
    credits.set_defaults(func=cmd_credits)

    ledger = sub.add_parser("ledger", parents=[where], help="a user's ledger, newest first")
    ledger.add_argument("user")
    ledger.add_argument("--group")
    ledger.add_argument("--limit", type=int, default=50)
    ledger.add_argument("--cursor")
    ledger.set_defaults(func=cmd_ledger)

    grant = sub.add_parser("grant", parents=[where], help="grant (or, negative, take back) tokens")
    grant.add_argument("user")
    grant.add_argument("group")
    grant.add_argument("tokens", type=int)
    grant.add_argument("--expires-at", help="ISO 8601 UTC, e.g. 2027-01-01T00:00:00Z")
    grant.add_argument("--reason")
    grant.add_argument("--idempotency-key", help="default: a fresh one per call")
    grant.set_defaults(func=cmd_grant)

    hold = sub.add_parser("hold", parents=[where], help="reserve tokens before the work (settle or release after)")
    hold.add_argument("user")
    hold.add_argument("group")
    hold.add_argument("tokens", type=int)
    hold.add_argument("--ttl", type=int, metavar="SECONDS",
                      help="released by itself after this long unless settled (default 900, at most 86400)")
    hold.add_argument("--max-overdraft", type=int, default=0, metavar="N")
    hold.add_argument("--key", "--idempotency-key", dest="idempotency_key", help="default: a fresh one per call")
    hold.set_defaults(func=cmd_hold)

    settle = sub.add_parser("settle", parents=[where],
                            help="settle a hold at the real cost: the rest goes back, an excess is consumed")
    settle.add_argument("user")
    settle.add_argument("hold", help="the holdId that `hold` printed")
    settle.add_argument("tokens", type=int)
    settle.add_argument("--max-overdraft", type=int, default=0, metavar="N", help="for an excess over the hold")
    settle.set_defaults(func=cmd_settle)

    release = sub.add_parser("release", parents=[where], help="give a hold's tokens back")
    release.add_argument("user")
    release.add_argument("hold", help="the holdId that `hold` printed")
    release.set_defaults(func=cmd_release)

    sweep = sub.add_parser("sweep", parents=[where], help="run the expiry sweep now")
    sweep.set_defaults(func=cmd_sweep)

    check = sub.add_parser("check", parents=[where], help="check balance == sum of ledger (one user or all)")
    check.add_argument("user", nargs="?")
    check.set_defaults(func=cmd_check)

    for name, text in (("pay", "the order's payment succeeds"), ("fail", "the order's payment fails"),
                       ("refund", "the order is refunded (all, or --amount N minor units)")):
        cmd = sub.add_parser(name, parents=[where], help=f"local Stripe: {text} (signed webhook)")
        cmd.add_argument("order_id")
        if name == "refund":
            cmd.add_argument("--amount", type=int)
        cmd.set_defaults(func=cmd_payment)

    for name, what, text in (
        ("checkout-complete", "session", "the customer pays a Checkout Session (cs_...)"),
        ("renew", "subscription", "a subscription (sub_...) renews: the next period's invoice is paid"),
        ("fail-renewal", "subscription", "a subscription's renewal payment fails: past_due"),
        ("cancel", "subscription", "the customer cancels a subscription (at once, or --at-period-end)"),
    ):
        cmd = sub.add_parser(name, parents=[where], help=f"local Stripe: {text} (signed webhooks)")
        cmd.add_argument("object_id", metavar=what.upper())
        if name == "cancel":
            cmd.add_argument("--at-period-end", action="store_true", help="end it when the current period ends")
        cmd.set_defaults(func=cmd_fake_billing)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S",
    )
    if not args.verbose:
        for noisy in ("botocore", "boto3", "pynamodb", "urllib3", "stripe"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        # Metrics are off locally; Powertools still warns on every invocation that none were published.
        warnings.filterwarnings("ignore", message="No application metrics to publish")
    try:
        code: int = args.func(args)
    except CliError as exc:
        print(f"user-credits: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
