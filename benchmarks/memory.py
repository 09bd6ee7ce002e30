"""Memory: the resident set of a warm handler process across 1,000 requests.

Each function runs in its own fresh interpreter (as one Lambda container would), which loads only that
function's handler and calls it with API Gateway HTTP API v2 events. RSS is read from
/proc/self/status (VmRSS, and VmHWM for the peak) after the import, after the 1st, 100th and last
request; growth between the 100th and the last request would be a leak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from benchmarks.common import BASE_ENV, PYTHON, REPO_ROOT, Engine, Service, function_environment, markdown_table

# Requests that touch DynamoDB on every call; `user` is granted a large balance first.
TARGETS = {
    "ConsumeFunction": ("POST", "/users/{user}/consume", {"offerGroup": "mem", "tokens": 1}),
    "GetCreditsFunction": ("GET", "/users/{user}/credits", None),
    "ListOffersFunction": ("GET", "/offers", None),
}
GROWTH_LIMIT_KIB = 1024


def _status() -> dict[str, int]:
    values: dict[str, int] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, amount, _unit = line.split()
                    values[name.rstrip(":")] = int(amount)
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        values = {"VmRSS": peak, "VmHWM": peak}
    return values


def _worker(function: str, user: str, requests: int) -> dict[str, Any]:
    """Runs in the child process: import one handler, call it `requests` times, report RSS."""
    import warnings

    from benchmarks.common import EventSink, silence_stdout
    from user_credits.events import publisher
    from user_credits_dev import template as tpl
    from user_credits_dev.lambda_events import LambdaContext, http_api_event

    warnings.filterwarnings("ignore", message="No application metrics to publish")
    sink = EventSink(keep=False)
    publisher.client_factory = lambda: sink
    publisher.reset_client()
    spec = next(s for s in tpl.functions({}) if s.logical_id == function)
    before_import = _status()
    handler = tpl.load_handler(spec)
    after_import = _status()
    method, route, body = TARGETS[function]
    path = route.format(user=user)
    route_path = route.replace("{user}", "{userId}") if "{user}" in route else route
    iam = path.startswith("/users/")
    checkpoints: dict[str, dict[str, int]] = {"before import": before_import, "after import": after_import}
    statuses: dict[int, int] = {}
    silence_stdout()
    for number in range(1, requests + 1):
        event = http_api_event(method, path, route_path=route_path, iam=iam, user=None if iam else user,
                               body=None if body is None else json.dumps(body))
        status = handler(event, LambdaContext(function_name=function))["statusCode"]
        statuses[status] = statuses.get(status, 0) + 1
        if number in (1, 100, requests) or number % max(1, requests // 10) == 0:
            checkpoints[f"after {number}"] = _status()
    return {"checkpoints": checkpoints, "statuses": statuses}


def run(engine: Engine, service: Service | None = None, *, requests: int = 1000) -> dict[str, Any]:
    service = service or Service(engine.endpoint, engine.tables)
    user = f"mem-{os.getpid()}-{int.from_bytes(os.urandom(4), 'big')}"
    granted = service.call("POST", f"/admin/users/{user}/grants", {"offerGroup": "mem", "tokens": 1_000_000},
                           iam=True)
    if granted.status != 201:
        raise RuntimeError(f"could not grant the memory benchmark's user: {granted.status} {granted.body}")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"),
           **function_environment(engine.endpoint, engine.tables), **BASE_ENV,
           "AWS_ENDPOINT_URL_DYNAMODB": engine.endpoint, "PYTHONPATH": str(REPO_ROOT)}
    rows = []
    for function in TARGETS:
        done = subprocess.run(
            [PYTHON, "-m", "benchmarks.memory", function, user, str(requests)],
            check=False, capture_output=True, text=True, env=env, cwd=str(REPO_ROOT), timeout=600,
        )
        if done.returncode != 0:
            rows.append({"function": function, "measured": False,
                         "note": (done.stderr.strip().splitlines() or ["failed"])[-1]})
            continue
        report = json.loads(done.stderr.strip().splitlines()[-1])
        points = report["checkpoints"]
        growth = points[f"after {requests}"]["VmRSS"] - points["after 100"]["VmRSS"]
        rows.append({
            "function": function, "measured": True, "requests": requests, "statuses": report["statuses"],
            "rss_after_import_kib": points["after import"]["VmRSS"],
            "rss_after_1_kib": points["after 1"]["VmRSS"],
            "rss_after_100_kib": points["after 100"]["VmRSS"],
            "rss_after_half_kib": points.get(f"after {requests // 2}", points["after 100"])["VmRSS"],
            "rss_after_last_kib": points[f"after {requests}"]["VmRSS"],
            "peak_kib": points[f"after {requests}"]["VmHWM"],
            "growth_100_to_last_kib": growth,
            "no_growth": growth <= GROWTH_LIMIT_KIB,
            "checkpoints": points,
        })
    return {"rows": rows, "requests": requests}


def markdown(result: dict[str, Any]) -> str:
    n = result["requests"]
    out = [
        f"One fresh process per function, {n:,} requests each (HTTP API v2 events, DynamoDB Local). RSS in MiB "
        f"from /proc/self/status. `no growth` = RSS after request {n:,} is within {GROWTH_LIMIT_KIB} KiB of RSS "
        "after request 100.",
        "",
    ]
    rows = []
    for r in result["rows"]:
        if not r["measured"]:
            rows.append([r["function"], "not measured", "-", "-", "-", "-", "-", "-", "-", r["note"]])
            continue
        mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        rows.append([
            r["function"], mib(r["rss_after_import_kib"]), mib(r["rss_after_1_kib"]), mib(r["rss_after_100_kib"]),
            mib(r["rss_after_half_kib"]), mib(r["rss_after_last_kib"]), mib(r["peak_kib"]),
            f"{r['growth_100_to_last_kib']:+,} KiB",
            "met" if r["no_growth"] else "**NOT MET**", statuses,
        ])
    out.append(markdown_table(
        ["function", "after import", "after 1", "after 100", f"after {n // 2:,}", f"after {n:,}", "peak (VmHWM)",
         "growth 100 -> last",
         "no growth", "statuses"], rows,
    ))
    return "\n".join(out)


if __name__ == "__main__":
    # Child mode: `python -m benchmarks.memory <function> <user> <requests>`; the report goes to stderr
    # because the handler's logs and metrics go to stdout (sent to /dev/null).
    outcome = _worker(sys.argv[1], sys.argv[2], int(sys.argv[3]))
    sys.stderr.write(json.dumps(outcome) + "\n")
