"""One run of every benchmark, side by side: `python -m benchmarks.run` (what `make bench` calls).

Sections: cold start (fresh interpreters), calls and capacity per request (in this process, DynamoDB
Local and the local Stripe fake; with the stream function's calls per request and the capacity model of
a consume), memory (one fresh process per function), hot balance (warm worker processes; with the
stream drain and the ledger checks after each run, the TransactionConflict simulation and a profile of
one consume). Prints a Markdown table per section and writes benchmarks/results/latest.md and latest.json.
Everything runs on loopback: DynamoDB Local is started here on 127.0.0.1 and stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from datetime import UTC, datetime
from typing import Any

from benchmarks import calls, cold_start, hot_balance, memory
from benchmarks.common import REPO_ROOT, RESULTS_DIR, apply_base_env, machine_load, start_engine

SECTIONS = ("cold", "calls", "memory", "hot")


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], check=False, capture_output=True, text=True, cwd=REPO_ROOT)
    return done.stdout.strip()


def _settings(quick: bool) -> dict[str, Any]:
    if quick:
        return {"cold_runs": 3, "hot_workers": (1, 4), "hot_duration": 1.0, "many_users": 1000, "many_workers": 4,
                "small_balance": 30, "small_duration": 1.0, "memory_requests": 200, "conflict_workers": 4,
                "conflict_duration": 1.5, "profile_requests": 100}
    return {"cold_runs": 5, "hot_workers": (1, 2, 4, 8), "hot_duration": 5.0, "many_users": 1000,
            "many_workers": 8, "small_balance": 100, "small_duration": 2.0, "memory_requests": 1000,
            "conflict_workers": 4, "conflict_duration": 3.0, "profile_requests": 300}


def _section(name: str, results: dict[str, Any], markdowns: dict[str, str], produce: Any, render: Any) -> None:
    started = time.perf_counter()
    print(f"\n## {name}: running...", flush=True)
    try:
        result = produce()
    except Exception as error:
        results[name] = {"measured": False, "error": f"{type(error).__name__}: {error}",
                         "trace": traceback.format_exc(limit=6)}
        markdowns[name] = f"Not measured: {type(error).__name__}: {error}"
        print(results[name]["trace"], file=sys.stderr)
    else:
        result["section_seconds"] = time.perf_counter() - started
        results[name] = result
        markdowns[name] = render(result)
    print(markdowns[name], flush=True)
    print(f"({name}: {time.perf_counter() - started:.0f} s)", flush=True)


# ---------------------------------------------------------------- the targets of issues 11, 7 and 4


def _targets(results: dict[str, Any]) -> list[list[str]]:
    rows: list[list[str]] = []

    def verdict(ok: bool | None) -> str:
        return "not measured" if ok is None else ("met" if ok else "**NOT MET**")

    cold = results.get("cold", {})
    if cold.get("functions"):
        measured = [f for f in cold["functions"] if f["measured"]]
        worst = max(measured, key=lambda f: f["ratio_to_boto3"])
        rows.append(["every handler import <= 2.5x `import boto3`",
                     f"worst {worst['function']} {worst['ratio_to_boto3']:.2f}x on CPU time "
                     f"({worst['cpu_median_ms']:.0f} ms vs {cold['boto3_cpu_median_ms']:.0f} ms; wall "
                     f"{worst['wall_ratio_to_boto3']:.2f}x: {worst['median_ms']:.0f} vs "
                     f"{cold['boto3_median_ms']:.0f} ms); "
                     f"{len(measured)} of {len(cold['functions'])} functions measured",
                     verdict(all(f["within_2_5x"] for f in measured))])
        offenders = [f["function"] for f in measured if not f["stripe_ok"]]
        rows.append(["functions that do not talk to Stripe do not import `stripe`",
                     "imported by: " + (", ".join(offenders) or "none of them"), verdict(not offenders)])
    else:
        rows.append(["cold start", "not measured", "not measured"])
    rows.extend(_call_targets(results.get("calls", {})))
    rows.extend(_hot_targets(results.get("hot", {})))
    mem = results.get("memory", {})
    for row in mem.get("rows", []):
        if row["measured"]:
            rows.append([f"no RSS growth over {row['requests']:,} requests: {row['function']}",
                         f"{row['growth_100_to_last_kib']:+,} KiB from request 100 to {row['requests']:,}; "
                         f"peak {row['peak_kib'] / 1024:.1f} MiB", verdict(row["no_growth"])])
    if not mem.get("rows"):
        rows.append(["memory", "not measured", "not measured"])
    return rows


def _call_targets(result: dict[str, Any]) -> list[list[str]]:
    found = {(r["route"], r["case"]): r for r in result.get("rows", [])}

    def line(label: str, key: tuple[str, str], limit: str, ok: Any) -> list[str]:
        row = found.get(key)
        if row is None or not row.get("measured"):
            return [label, "not measured", "not measured"]
        ops = ", ".join(f"{k} x{v}" if v > 1 else k for k, v in row["operations"].items())
        figure = f"{row['dynamodb_calls']} call(s) ({ops}), status {row['status']}; target {limit}"
        return [label, figure, "met" if ok(row) else "**NOT MET**"]

    consume = "POST /users/{userId}/consume"
    consumes = [r for (route, _case), r in found.items() if route == consume and r.get("measured")]
    # The rare retry of a key whose record the stream has not completed yet is the one designed transaction.
    normal = [r for r in consumes if "rare path" not in r["case"]]
    balance_tx = sum(r["balance_transactions"] + r["stream"]["balance_transactions"] for r in normal)
    rows = [
        line("unkeyed consume: 1 DynamoDB call", (consume, "success"), "1",
             lambda r: r["dynamodb_calls"] == 1 and r["status"] == 200),
        line("keyed consume (Idempotency-Key): <= 2 DynamoDB calls", (consume, "Idempotency-Key first"),
             "<= 2", lambda r: r["dynamodb_calls"] <= 2 and r["status"] == 200),
        line("keyed replay: 1 DynamoDB call", (consume, "Idempotency-Key replay"), "1",
             lambda r: r["dynamodb_calls"] == 1 and r["status"] == 200),
        ["0 transactions that include the balance item, on the consume path (request and stream)",
         (f"{balance_tx} over {len(normal)} consume cases (the rare retry before the stream completed a key's "
          "record is left out: it is the one designed transaction)") if normal else "not measured",
         ("met" if balance_tx == 0 else "**NOT MET**") if normal else "not measured"],
        line("consume refused: <= 2 DynamoDB calls", (consume, "insufficient (402)"), "<= 2",
             lambda r: r["dynamodb_calls"] <= 2),
        line("credits: 1 DynamoDB call", ("GET /credits", "own credits"), "1",
             lambda r: r["dynamodb_calls"] == 1 and r["status"] == 200),
        line("webhook purchase <= 3 calls plus one transaction",
             ("POST /webhooks/stripe", "payment_intent.succeeded (purchase)"), "<= 3 + 1 transaction",
             lambda r: r["dynamodb_calls"] - r["transactions"] <= 3 and r["transactions"] <= 1
             and r["status"] == 200),
    ]
    rows.extend(_hold_call_targets(result, found, line))
    model = (result.get("capacity") or {}).get("cases", {})
    unkeyed, keyed = model.get("unkeyed"), model.get("keyed")
    if unkeyed:
        rows.append(["<= 2 WCU per unkeyed consume, its ledger entry included (AWS prices, from the calls)",
                     f"{unkeyed['units_total']:g} WCU ({unkeyed['units_request']:g} request + "
                     f"{unkeyed['units_stream']:g} stream); keyed: {keyed['units_total']:g}" if keyed else "",
                     "met" if unkeyed["units_total"] <= 2 else "**NOT MET**"])
        per_second = unkeyed["consumes_per_second"] or 0.0
        rows.append([">= 900 consumes/s per balance partition on paper (1,000 WCU/s per partition)",
                     f"{per_second:,.0f}/s unkeyed (busiest: {unkeyed['bounding_partition']}); keyed "
                     f"{(keyed or {}).get('consumes_per_second') or 0:,.0f}/s",
                     "met" if per_second >= 900 else "**NOT MET**"])
    else:
        rows.append(["capacity model", "not measured", "not measured"])
    return rows


def _hold_call_targets(result: dict[str, Any], found: dict[tuple[str, str], Any], line: Any) -> list[list[str]]:
    """Issue 12: a hold and its settle each at most 2 DynamoDB calls, never a transaction that includes
    the balance item (request and stream), on every hold path; and the write units of a pair."""
    hold, settle, release = calls.HOLD_ROUTES
    measured = [r for (route, _case), r in found.items() if route in calls.HOLD_ROUTES and r.get("measured")]
    if not measured:
        return [["holds: calls per hold and settle", "not measured (holds not landed)", "not measured"]]

    def within(r: dict[str, Any]) -> bool:
        return bool(r["dynamodb_calls"] <= 2 and r["transactions"] == 0 and r["status_ok"])

    rows = [
        line("unkeyed hold: <= 2 DynamoDB calls, no transaction", (hold, "unkeyed"), "<= 2", within),
        line("keyed hold (Idempotency-Key): <= 2 DynamoDB calls, no transaction", (hold, "Idempotency-Key first"),
             "<= 2", within),
        line("settle: <= 2 DynamoDB calls, no transaction", (settle, "below the hold (returns the rest)"), "<= 2",
             within),
        line("release: <= 2 DynamoDB calls, no transaction", (release, "release"), "<= 2", within),
        line("repeated settle (replay): <= 2 DynamoDB calls, no transaction", (settle, "same settle again (replay)"),
             "<= 2", within),
    ]
    balance_tx = [r for r in measured if r["balance_transactions"] + r["stream"]["balance_transactions"]]
    over = [r for r in measured if not within(r)]
    total_tx = sum(r["balance_transactions"] + r["stream"]["balance_transactions"] for r in measured)
    where = "; ".join(f"{r['case']}: {r['dynamodb_calls']} calls ({calls._ops(r['operations'])})" for r in balance_tx)
    rows.append([
        "0 transactions that include the balance item, on every hold/settle/release path (request and stream)",
        f"{total_tx} over {len(measured)} cases; {where or 'none'}"
        + (f"; {len(over)} cases over 2 calls or with a transaction" if over else ""),
        "met" if not balance_tx else "**NOT MET**"])
    model = ((result.get("capacity") or {}).get("holds") or {})
    if model:
        cycle = model["cases"]["cycle_pair"]
        first = model["pair_first"]
        rows.append(["hold + settle write units, AWS prices (informational)",
                     f"the group's first pair {first['units']:g} WCU ({first['pairs_per_second'] or 0:,.0f} pairs/s "
                     f"per balance on paper); averaged over a cycle of {model['max_pending']} pairs (the last settle "
                     f"forcing the rewrite) {cycle['units_total']:.1f} WCU ({cycle['consumes_per_second'] or 0:,.0f} "
                     f"pairs/s), balance item up to {cycle['balance_item_bytes'] or 0:,} B", "informational"])
    return rows


def _hot_targets(result: dict[str, Any]) -> list[list[str]]:
    rows = result.get("rows", [])
    if not rows:
        return [["hot balance", "not measured", "not measured"]]
    out = []
    ours = [r for r in rows if r["implementation"] == "ours"]
    if not ours:
        out.append(["ours >= 0.8x floor", "not measured (consume not landed)", "not measured"])
    for r in ours:
        if r.get("ratio_to_floor") is not None:
            required = r["workers"] in (1, 4)
            out.append([f"ours >= 0.8x floor ({r['scenario']}, N={r['workers']})"
                        + ("" if required else " (not an issue-11 target)"),
                        f"{r['ratio_to_floor']:.2f}x ({r['per_second']:,.0f}/s)",
                        ("met" if r["ratio_to_floor"] >= 0.8 else "**NOT MET**") if required
                        else ("above" if r["ratio_to_floor"] >= 0.8 else "below")])
    for r in result.get("interleaved") or []:
        if "ours" in r["median"]:
            values = r["ratios"]["ours"]
            out.append([f"ours >= 0.8x floor, interleaved slices ({r['scenario']}, N={r['workers']})",
                        f"{r['median']['ours']:.2f}x median of {r['rounds']} rounds ({min(values):.2f}-"
                        f"{max(values):.2f})", "met" if r["median"]["ours"] >= 0.8 else "**NOT MET**"])
    core = [r for r in rows if r["implementation"] == "ours_core" and r.get("ratio_to_floor") is not None]
    if core:
        out.append(["ours_core (the consume's core without its HTTP layer) / floor (informational)",
                    "; ".join(f"{r['scenario']} N={r['workers']}: {r['ratio_to_floor']:.2f}x" for r in core),
                    "informational"])
    if ours:
        checked = [r for r in rows if r["implementation"] in ("ours", "ours_core")]
        bad = [r for r in checked if not hot_balance.ours_ok(r)]
        out.append(["ours and ours_core: zero overdrafts and lost updates; after the stream drain, per user ledger "
                    "sum == balance and seq 1..n; one entry per success",
                    f"{len(checked)} runs, {len(bad)} with a discrepancy", "met" if not bad else "**NOT MET**"])
        drains = [r for r in ours if r["stream"]["seconds"] and r["per_second"] and "runs out" not in r["scenario"]]
        if drains:
            slowest = min(drains, key=lambda r: r["stream"]["records"] / r["stream"]["seconds"] / r["per_second"])
            rate = slowest["stream"]["records"] / slowest["stream"]["seconds"]
            out.append(["stream drain keeps up with the consumes (informational)",
                        f"slowest: {rate:,.0f} records/s after {slowest['per_second']:,.0f} consumes/s "
                        f"({slowest['scenario']}, N={slowest['workers']})",
                        "keeps up" if rate >= slowest["per_second"] else "**falls behind**"])
    out.extend(_pair_targets(rows))
    for r in result.get("interleaved") or []:
        if "ours_holds" in r["median"]:
            values = r["ratios"]["ours_holds"]
            out.append([f"hold+settle pairs/s >= 0.4x floor writes/s, interleaved slices ({r['scenario']}, "
                        f"N={r['workers']})", f"{r['median']['ours_holds']:.2f}x median of {r['rounds']} rounds "
                        f"({min(values):.2f}-{max(values):.2f})",
                        "met" if r["median"]["ours_holds"] >= 0.4 else "**NOT MET**"])
    naive = [r for r in rows if r["implementation"] == "naive"]
    seen = [r for r in naive if r["lost_updates"] or r["overdraft"]]
    out.append(["naive read-then-write shows lost updates or overdrafts (the benchmark can see them)",
                "; ".join(f"{r['scenario']} N={r['workers']}: {r['lost_updates']:,} lost, {r['overdraft']:,} "
                          "overdrawn" for r in naive if r["workers"] > 1),
                "met" if seen else "**NOT MET**"])
    conflicts = result.get("conflicts") or []
    alone = [r for r in conflicts if r["scenario"].endswith("alone")]
    if alone:
        raised = sum(v for r in alone for k, v in r["hook"].items() if k.startswith("TransactionConflictException"))
        retries = sum(r["telemetry"].get("metric ConsumeRetries", 0) for r in alone)
        out.append(["0 conflict retries with consumes alone (TransactionConflict simulation, unkeyed and keyed)",
                    f"{raised} conflicts, {retries} ConsumeRetries over "
                    f"{sum(r['successes'] for r in alone):,} consumes ({len(alone)} runs)",
                    "met" if raised == 0 and retries == 0 else "**NOT MET**"])
        mixed = [c for c in conflicts if c not in alone]
        fivexx = sum(v for c in mixed for k, v in c["errors"].items() if k.startswith(("http_5", "exception")))
        broken = [c for c in mixed if not hot_balance.ours_ok(c)]
        out.append(["with concurrent grants: every consume answers 200 or 402, balance and ledger still match",
                    f"{fivexx} 5xx; {len(broken)} of {len(mixed)} runs with a discrepancy",
                    "met" if fivexx == 0 and not broken else "**NOT MET**"])
    else:
        out.append(["0 conflict retries with consumes alone", "not measured", "not measured"])
    return out


def _pair_targets(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Issue 12: hold+settle pairs per second beside the floor, zero overdrafts, a complete ledger."""
    pairs = [r for r in rows if r["implementation"] == "ours_holds"]
    if not pairs:
        return [["hold+settle pairs >= 0.4x floor", "not measured (holds not landed)", "not measured"]]
    out = []
    for r in pairs:
        if r.get("ratio_to_floor") is None:
            continue
        required = r["workers"] in (1, 4)
        out.append([f"hold+settle pairs/s >= 0.4x floor writes/s ({r['scenario']}, N={r['workers']})"
                    + ("" if required else " (not an issue-12 target)"),
                    f"{r['ratio_to_floor']:.2f}x ({r['per_second']:,.0f} pairs/s)",
                    ("met" if r["ratio_to_floor"] >= 0.4 else "**NOT MET**") if required
                    else ("above" if r["ratio_to_floor"] >= 0.4 else "below")])
    bad = [r for r in pairs if not hot_balance.ours_ok(r)]
    wrong = [r for r in pairs if not hot_balance.ours_ok({**r, "errors": {}})]
    failed: dict[str, int] = {}
    for r in pairs:
        for key, value in r["errors"].items():
            failed[key] = failed.get(key, 0) + value
    out.append(["hold+settle pairs: zero overdrafts and lost updates; after the stream drain, per user ledger "
                "sum == balance and seq 1..n; two entries per pair; no 5xx",
                f"{len(pairs)} runs: {len(wrong)} with a balance or ledger discrepancy, {len(bad) - len(wrong)} more "
                f"with failed requests only" + ("" if not failed else " (" + ", ".join(
                    f"{k} x{v}" for k, v in sorted(failed.items())) + f" over {sum(r['successes'] for r in pairs):,} "
                    "pairs)"),
                "met" if not bad else "**NOT MET**"])
    figures = [hot_balance.pair_calls(r) for r in pairs if r.get("calls")]
    if figures:
        calls = sum(f["calls"] for f in figures)
        requests = sum(2 * r["successes"] for r in pairs if r.get("calls"))
        balance_tx = sum(f["balance_transactions"] for f in figures)
        total_pairs = sum(r["successes"] for r in pairs if r.get("calls"))
        out.append(["hold+settle under load: never a transaction that includes the balance item",
                    f"{balance_tx:,} over {total_pairs:,} pairs ({1000 * balance_tx / max(1, total_pairs):.1f} per "
                    f"1,000 pairs); {calls / max(1, total_pairs):.3f} calls per pair "
                    f"({calls / max(1, requests):.3f} per request)",
                    "met" if balance_tx == 0 else "**NOT MET**"])
    return out


def _header(settings: dict[str, Any], args: argparse.Namespace, started: datetime, load_before: str,
            load_after: str, total: float) -> str:
    dirty = _git("status", "--porcelain", "--", "shared", "functions", "template.yaml")
    return "\n".join([
        "# user-credits benchmarks: latest run",
        "",
        f"- Command: `{' '.join(['python -m benchmarks.run', *sys.argv[1:]])}`",
        f"- Date: {started.strftime('%Y-%m-%d %H:%M UTC')}; total {total:.0f} s",
        f"- Commit: {_git('rev-parse', '--short', 'HEAD')}"
        + (" (with uncommitted changes in shared/, functions/ or template.yaml)" if dirty else ""),
        f"- Machine: {platform.machine()}, {platform.python_implementation()} {platform.python_version()}; "
        f"{load_before} at the start, {load_after} at the end (other work shares these CPUs, so absolute "
        "figures are noisy; the side-by-side ratios matter more)",
        f"- Settings: {json.dumps(settings)}" + (" (--quick smoke run)" if args.quick else ""),
        "- Engine: DynamoDB Local (amplify-dynamodb-simulator's jar) on 127.0.0.1, in memory; Stripe: the local "
        "fake (user_credits_dev.stripe_fake).",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a shorter smoke run (about a minute)")
    parser.add_argument("--only", action="append", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--no-write", action="store_true", help="do not write benchmarks/results/latest.*")
    args = parser.parse_args(argv)
    apply_base_env()
    settings = _settings(args.quick)
    wanted = args.only or list(SECTIONS)
    started_at = datetime.now(UTC)
    started = time.perf_counter()
    load_before = machine_load()
    results: dict[str, Any] = {}
    markdowns: dict[str, str] = {}
    titles = {"cold": "Cold start", "calls": "Calls and capacity per request", "memory": "Memory",
              "hot": "Hot balance and many users"}
    if "cold" in wanted:
        _section("cold", results, markdowns, lambda: cold_start.run(runs=settings["cold_runs"]), cold_start.markdown)
    engine = start_engine() if set(wanted) - {"cold"} else None
    try:
        if engine is not None:
            if "calls" in wanted:
                _section("calls", results, markdowns, lambda: calls.run(engine), calls.markdown)
            if "memory" in wanted:
                _section("memory", results, markdowns,
                         lambda: memory.run(engine, requests=settings["memory_requests"]), memory.markdown)
            if "hot" in wanted:
                _section("hot", results, markdowns, lambda: hot_balance.run(
                    engine, workers=settings["hot_workers"], duration=settings["hot_duration"],
                    many_users=settings["many_users"], many_workers=settings["many_workers"],
                    small_balance=settings["small_balance"], small_duration=settings["small_duration"],
                    conflict_workers=settings["conflict_workers"], conflict_duration=settings["conflict_duration"],
                    profile_requests=settings["profile_requests"],
                ), hot_balance.markdown)
    finally:
        if engine is not None:
            engine.stop()
    total = time.perf_counter() - started
    header = _header(settings, args, started_at, load_before, machine_load(), total)
    from benchmarks.common import markdown_table

    summary = markdown_table(["target (issues 12, 11, 7, 4)", "measured", "verdict"], _targets(results))
    document = [header, "", "## Targets", "", summary]
    for name in SECTIONS:
        if name in markdowns:
            document += ["", f"## {titles[name]}", "", markdowns[name]]
    text = "\n".join(document) + "\n"
    print("\n## Targets\n\n" + summary)
    if not args.no_write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        (RESULTS_DIR / "latest.md").write_text(text, encoding="utf-8")
        payload = {"command": " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
                   "started": started_at.isoformat(), "seconds": total, "settings": settings,
                   "load_before": load_before, "load_after": machine_load(), "commit": _git("rev-parse", "HEAD"),
                   "results": results}
        (RESULTS_DIR / "latest.json").write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
        print(f"\nwrote {RESULTS_DIR / 'latest.md'} and latest.json ({total:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
