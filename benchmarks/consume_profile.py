"""Where one request's time goes, by layer: cProfile over many sequential requests, grouped by package.

Runs inside a hot-balance worker process (production logging and metrics settings, stdout to a file),
for the consume handler and for the floor (a bare conditional UpdateItem through boto3), so the two can be
read side by side. Every profiled function's own time (cProfile's `tottime`) goes to one layer, chosen by
the file the function is in. C functions (file `~`) have no file: their time goes to the layers of their
callers, in proportion to what each caller spent in them, except the socket calls (`recv_into`, `sendall`,
`connect`, `select`, `poll`), which are the wait for DynamoDB Local and get a layer of their own.

cProfile slows Python code down (every call is timed), so the profiled total is larger than the unprofiled
time measured just before it (`wall_ms`, `cpu_ms` per request, no profiler); the shares are what to read.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from collections.abc import Callable
from typing import Any

SOCKET_CALLS = ("recv_into", "recv", "sendall", "send", "connect", "select", "poll", "getaddrinfo")

# (layer, path fragments), first match wins; paths use "/" on every platform we run.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("Powertools metrics (EMF: add_metric, the flush and its print)", ("aws_lambda_powertools/metrics/",)),
    ("Powertools logging (Logger, inject_lambda_context, append_keys)", ("aws_lambda_powertools/logging/",)),
    ("Powertools validation (OpenAPI middleware) + pydantic", ("aws_lambda_powertools/event_handler/openapi/",
                                                               "pydantic/", "pydantic_core/")),
    ("Powertools resolver (routing, Response, middleware chain)", ("aws_lambda_powertools/event_handler/",)),
    ("Powertools other", ("aws_lambda_powertools/",)),
    ("botocore: request serialisation and parameter validation", ("botocore/serialize.py", "botocore/validate.py")),
    ("botocore: SigV4 signing", ("botocore/auth.py", "botocore/signers.py", "hmac.py", "hashlib.py")),
    ("botocore: response parsing", ("botocore/parsers.py",)),
    ("botocore: the rest (client, hooks, endpoint, retries, models)", ("botocore/",)),
    ("HTTP client (urllib3, http.client)", ("urllib3/", "http/client.py", "socket.py", "email/")),
    ("pynamodb", ("pynamodb/",)),
    ("boto3", ("boto3/",)),
    ("user_credits.api (caller and body checks, JSON response)", ("user_credits/api/", "functions/")),
    ("user_credits logic, store, domain (the decision, the change's JSON)", ("user_credits/",)),
    ("stdlib logging", ("logging/",)),
    ("json", ("json/",)),
    ("benchmark driver", ("benchmarks/", "user_credits_dev/")),
)
SOCKET_LAYER = "socket wait (DynamoDB Local's work + loopback)"
OTHER = "other Python (stdlib, typing, uuid, datetime, ...)"


def _layer(filename: str) -> str:
    path = filename.replace("\\", "/")
    for name, fragments in LAYERS:
        if any(fragment in path for fragment in fragments):
            return name
    return OTHER


def _charge(out: dict[str, float], top: dict[str, dict[str, float]], layer: str, label: str, seconds: float) -> None:
    out[layer] = out.get(layer, 0.0) + seconds
    functions = top.setdefault(layer, {})
    functions[label] = functions.get(label, 0.0) + seconds


def layers(stats: pstats.Stats) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Seconds of own time per layer (C functions charged to their callers' layers), and per layer the
    seconds of each function in it."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    out: dict[str, float] = {}
    top: dict[str, dict[str, float]] = {}
    for func, (_cc, _nc, own, _cum, callers) in table.items():
        filename, line, name = func
        if filename != "~":
            short = "/".join(filename.replace("\\", "/").split("/")[-2:])
            _charge(out, top, _layer(filename), f"{short}:{line} {name}", own)
            continue
        if any(f"'{call}'" in name or name.endswith(f".{call}>") for call in SOCKET_CALLS):
            _charge(out, top, SOCKET_LAYER, name, own)
            continue
        spent = sum(entry[2] for entry in callers.values()) if callers else 0.0
        if not callers or spent <= 0:
            _charge(out, top, OTHER, name, own)
            continue
        for caller, entry in callers.items():
            layer = _layer(caller[0]) if caller[0] != "~" else OTHER
            _charge(out, top, layer, name, own * entry[2] / spent)
    return out, top


def profile(calls: dict[str, Callable[[], Any]], requests: int, rounds: int = 10) -> dict[str, Any]:
    """For each named call: `requests` calls unprofiled (wall and CPU time per call), then as many under
    cProfile. The calls take turns in `rounds` chunks, so that a change of load on the machine weighs on
    each alike."""
    for call in calls.values():
        for _ in range(20):  # warm
            call()
    chunk = max(1, requests // rounds)
    wall = dict.fromkeys(calls, 0.0)
    cpu = dict.fromkeys(calls, 0.0)
    profilers = {name: cProfile.Profile() for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(chunk):
                call()
            wall[name] += time.perf_counter() - started
            cpu[name] += time.process_time() - cpu_started
    for _ in range(rounds):
        for name, call in calls.items():
            profilers[name].enable()
            for _ in range(chunk):
                call()
            profilers[name].disable()
    done = chunk * rounds
    result: dict[str, Any] = {}
    for name in calls:
        seconds, functions = layers(pstats.Stats(profilers[name]))
        per_request = {layer: value * 1000 / done for layer, value in seconds.items()}
        result[name] = {
            "requests": done, "wall_ms": wall[name] * 1000 / done, "cpu_ms": cpu[name] * 1000 / done,
            "profiled_ms": sum(per_request.values()),
            "layers_ms": dict(sorted(per_request.items(), key=lambda kv: -kv[1])),
            "top_functions_ms": {layer: dict(sorted(((f, v * 1000 / done) for f, v in found.items()),
                                                    key=lambda kv: -kv[1])[:8])
                                 for layer, found in functions.items()},
        }
    return result


def handler_alone(call: Callable[[], Any], requests: int) -> dict[str, float]:
    """The consume handler without its core: `logic.consumption.consume_tokens` answers a fixed 200 (no
    DynamoDB call, no metric), so what is left is Powertools (routing, validation, logging, the metrics
    flush) and our API layer, unprofiled: cProfile charges a lot to code made of many small calls, as
    Powertools is. Restored afterwards."""
    from user_credits.logic import consumption

    real = consumption.consume_tokens
    answer = consumption.ConsumeResult(200, {"userId": "u", "offerGroup": "g", "consumed": 1, "balance": 1,
                                             "expiresAt": None})
    consumption.consume_tokens = lambda *args, **kwargs: answer  # type: ignore[assignment]
    try:
        for _ in range(20):
            call()
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(requests):
            call()
        return {"requests": requests, "wall_ms": (time.perf_counter() - started) * 1000 / requests,
                "cpu_ms": (time.process_time() - cpu_started) * 1000 / requests}
    finally:
        consumption.consume_tokens = real


def markdown(result: dict[str, Any]) -> str:
    from benchmarks.common import markdown_table

    ours, floor = result["ours"], result["floor"]
    names = list(dict.fromkeys([*ours["layers_ms"], *floor["layers_ms"]]))
    rows = []
    for name in names:
        a, b = ours["layers_ms"].get(name, 0.0), floor["layers_ms"].get(name, 0.0)
        rows.append([name, f"{a:.3f}", f"{100 * a / ours['profiled_ms']:.0f}%", f"{b:.3f}",
                     f"{100 * b / floor['profiled_ms']:.0f}%", f"{a - b:+.3f}"])
    rows.append(["**total under cProfile**", f"{ours['profiled_ms']:.3f}", "100%", f"{floor['profiled_ms']:.3f}",
                 "100%", f"{ours['profiled_ms'] - floor['profiled_ms']:+.3f}"])
    rows.append(["without the profiler: wall ms per request", f"{ours['wall_ms']:.3f}", "", f"{floor['wall_ms']:.3f}",
                 "", f"{ours['wall_ms'] - floor['wall_ms']:+.3f}"])
    rows.append(["without the profiler: client CPU ms per request", f"{ours['cpu_ms']:.3f}", "",
                 f"{floor['cpu_ms']:.3f}", "", f"{ours['cpu_ms'] - floor['cpu_ms']:+.3f}"])
    alone = result.get("handler_alone")
    if alone:
        rows.append(["without the profiler: client CPU ms per request of the handler alone (its core "
                     "answering at once: Powertools and our API layer)", f"{alone['cpu_ms']:.3f}", "", "-", "", ""])
    out = [markdown_table(["layer", "ours ms/request", "ours share", "floor ms/request", "floor share",
                           "ours - floor"], rows)]
    out += ["", "The largest functions of the consume's own layers (ms per request under cProfile):", ""]
    detail = []
    for layer in names:
        if layer.startswith(("Powertools", "user_credits", "other Python")) and layer in ours["top_functions_ms"]:
            found = ours["top_functions_ms"][layer]
            detail.append([layer, "; ".join(f"{f} {v:.3f}" for f, v in list(found.items())[:5])])
    out.append(markdown_table(["layer", "top functions"], detail))
    return "\n".join(out)
