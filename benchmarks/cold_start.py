"""Cold start: what a fresh Lambda interpreter pays to import each function's handler module.

For every function of template.yaml, a fresh `python -c` imports the handler module from its CodeUri
folder (the core package comes from the installed layer, as on Lambda) and reports the import time
measured inside that interpreter, so interpreter start-up is excluded on both sides of the ratio. The
baseline is `import boto3` alone in the same way. One extra `-X importtime` run per function says which
packages the time went to, and the same subprocess reports whether `stripe` ended up in sys.modules.

Sizes: each function's code folder, and the layer = `shared/` (the user_credits package) plus the
installed distributions that shared/requirements.txt pulls in. boto3 and its dependencies are listed
apart: the Lambda runtime has its own, though the layer ships the pinned ones (shared/requirements.lock).
This runs in the dev venv; `make bench` also times the same imports from the built layer under
python3.13 (devtools/user_credits_dev/built_imports.py).
"""

from __future__ import annotations

import json
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.common import BASE_ENV, PYTHON, QUIET_ENV, REPO_ROOT, kib, markdown_table, median

BOTO3_LIMIT_RATIO = 2.5
# Functions that have a reason to import the Stripe SDK (they create PaymentIntents or read webhooks).
STRIPE_FUNCTIONS = {"CreateOrderFunction", "StripeWebhookFunction"}
# Packages whose import cost is shown per function (sum of the self times of their modules, -X importtime).
WATCHED = (
    "botocore", "boto3", "aws_lambda_powertools", "pydantic", "pydantic_core", "pynamodb", "stripe", "requests",
    "urllib3", "yaml", "user_credits",
)

_IMPORT_SCRIPT = r"""
import importlib, json, sys, time
sys.path.insert(0, {folder!r})
before = set(sys.modules)
t0, c0 = time.perf_counter(), time.process_time()
module = importlib.import_module({module!r})
target = getattr(module, {attr!r}) if {attr!r} else module
elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
new = sorted({{m.split('.')[0] for m in sys.modules if m not in before}})
ours = sorted(m for m in sys.modules if m.startswith("user_credits.") and m not in before)
print(json.dumps({{"seconds": elapsed, "cpu_seconds": cpu, "stripe": "stripe" in sys.modules, "packages": new,
                   "user_credits_modules": ours,
                   "modules": len(sys.modules) - len(before)}}))
"""


def _targets() -> list[dict[str, Any]]:
    from user_credits_dev import template as tpl

    fake_tables = {logical: f"cold-{logical}" for logical in tpl.table_names("x")}
    targets: list[dict[str, Any]] = [
        {"name": "import boto3", "folder": str(REPO_ROOT), "module": "boto3", "attr": "", "env": {}, "baseline": True}
    ]
    for spec in tpl.functions(fake_tables):
        module, attr = spec.handler.rsplit(".", 1)
        targets.append({
            "name": spec.logical_id,
            "folder": str(spec.code_uri),
            "code_uri": str(spec.code_uri.relative_to(REPO_ROOT)),
            "module": module,
            "attr": attr,
            "env": spec.environment,
            "baseline": False,
            "exists": (spec.code_uri / f"{module}.py").exists(),
        })
    return targets


def _env(target: dict[str, Any]) -> dict[str, str]:
    # The core package of THIS checkout first on sys.path, as the layer's /opt/python is on Lambda (an
    # editable install of the package may point at another checkout).
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), "PYTHONHASHSEED": "0",
           "PYTHONPATH": str(REPO_ROOT / "shared")}
    env.update(BASE_ENV)
    env.update(QUIET_ENV)
    env.update(target["env"])
    return env


def _run_import(target: dict[str, Any], *, importtime: bool = False) -> tuple[dict[str, Any], str]:
    script = _IMPORT_SCRIPT.format(folder=target["folder"], module=target["module"], attr=target["attr"])
    args = [PYTHON, *(["-X", "importtime"] if importtime else []), "-c", script]
    done = subprocess.run(args, check=False, capture_output=True, text=True, env=_env(target), cwd="/tmp", timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{target['name']}: import failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


_IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)$")


def _package_costs(stderr: str) -> dict[str, float]:
    """Import time (ms) per top-level package: the sum of its modules' self times from `-X importtime`.

    Self times, not cumulative ones: a package's `__init__` is often light while its submodules are
    imported later by someone else, so cumulative times would misattribute the cost.
    """
    costs: dict[str, float] = {}
    for line in stderr.splitlines():
        match = _IMPORTTIME_LINE.match(line)
        if not match:
            continue
        top = match.group(4).split(".")[0]
        key = top if top in WATCHED else "other"
        costs[key] = costs.get(key, 0.0) + int(match.group(1)) / 1000
        costs["total"] = costs.get("total", 0.0) + int(match.group(1)) / 1000
    return costs


# ---------------------------------------------------------------- sizes


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _dist_size(dist: metadata.Distribution) -> int:
    total = 0
    for file in dist.files or []:
        if "__pycache__" in file.parts or file.suffix == ".pyc":
            continue
        path = Path(str(dist.locate_file(file)))
        if path.is_file():
            total += path.stat().st_size
    return total


def _requirement_names(lines: list[str]) -> list[str]:
    names = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if not line or "extra ==" in line:
            continue
        marker = line.split(";", 1)[1].strip() if ";" in line else ""
        if marker and not _marker_holds(marker):
            continue
        match = re.match(r"[A-Za-z0-9_.\-]+", line)
        if match:
            names.append(match.group(0))
    return names


def _marker_holds(marker: str) -> bool:
    try:
        from packaging.markers import Marker
    except ImportError:
        return True
    return bool(Marker(marker).evaluate())


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _closure(roots: list[str]) -> dict[str, tuple[metadata.Distribution, str]]:
    """Installed distributions reachable from `roots`: name -> (distribution, the root that pulled it in)."""
    found: dict[str, tuple[metadata.Distribution, str]] = {}
    for root in roots:
        stack = [root]
        while stack:
            name = _norm(stack.pop())
            if name in found:
                continue
            try:
                dist = metadata.distribution(name)
            except metadata.PackageNotFoundError:
                continue
            found[name] = (dist, root)
            stack.extend(_requirement_names(dist.requires or []))
    return found


def sizes() -> dict[str, Any]:
    from user_credits_dev import template as tpl

    functions = []
    for spec in tpl.functions({}):
        folder = spec.code_uri
        functions.append({
            "function": spec.logical_id,
            "code_uri": str(folder.relative_to(REPO_ROOT)),
            "bytes": _tree_size(folder) if folder.exists() else 0,
        })
    package = REPO_ROOT / "shared" / "user_credits"
    requirements = (REPO_ROOT / "shared" / "requirements.txt").read_text().splitlines()
    runtime = set(_closure(["boto3"]))
    deps = []
    for name, (dist, root) in sorted(_closure(_requirement_names(requirements)).items()):
        deps.append({
            "distribution": dist.metadata["Name"],
            "version": dist.version,
            "bytes": _dist_size(dist),
            "pulled_in_by": root,
            "in_lambda_runtime": name in runtime,
        })
    boto_set = [
        {"distribution": dist.metadata["Name"], "version": dist.version, "bytes": _dist_size(dist)}
        for _name, (dist, _root) in sorted(_closure(["boto3"]).items())
    ]
    shipped = sum(d["bytes"] for d in deps if not d["in_lambda_runtime"])
    return {
        "functions": functions,
        "user_credits_bytes": _tree_size(package),
        "dependencies": deps,
        "boto3_runtime_set": boto_set,
        "layer_bytes_without_runtime": _tree_size(package) + shipped,
        "layer_bytes_with_runtime": _tree_size(package) + sum(d["bytes"] for d in deps),
        "boto3_set_bytes": sum(d["bytes"] for d in boto_set),
    }


# ---------------------------------------------------------------- the section


def run(runs: int = 5) -> dict[str, Any]:
    targets = _targets()
    present = [t for t in targets if t["baseline"] or t["exists"]]
    for target in present:  # warm the bytecode caches; not counted
        _run_import(target)
    samples: dict[str, list[float]] = {t["name"]: [] for t in present}
    cpu: dict[str, list[float]] = {t["name"]: [] for t in present}
    facts: dict[str, dict[str, Any]] = {}
    for _round in range(runs):  # interleaved, so load spikes spread over every target
        for target in present:
            result, _ = _run_import(target)
            samples[target["name"]].append(result["seconds"] * 1000)
            cpu[target["name"]].append(result["cpu_seconds"] * 1000)
            facts[target["name"]] = result
    costs = {t["name"]: _package_costs(_run_import(t, importtime=True)[1]) for t in present}
    baseline = median(samples["import boto3"])
    baseline_cpu = median(cpu["import boto3"])
    rows = []
    for target in targets:
        if target["baseline"]:
            continue
        name = target["name"]
        if name not in samples:
            rows.append({"function": name, "code_uri": target["code_uri"], "measured": False})
            continue
        ms = median(samples[name])
        cpu_ms = median(cpu[name])
        # The verdict uses CPU time: on a shared machine wall time also counts the time spent waiting for
        # a CPU, which inflates whichever import was unlucky; CPU time is what an idle machine would see.
        ratio = cpu_ms / baseline_cpu
        imports_stripe = bool(facts[name]["stripe"])
        rows.append({
            "function": name,
            "code_uri": target["code_uri"],
            "measured": True,
            "median_ms": ms,
            "min_ms": min(samples[name]),
            "max_ms": max(samples[name]),
            "samples_ms": samples[name],
            "cpu_median_ms": cpu_ms,
            "cpu_min_ratio_to_boto3": min(cpu[name]) / min(cpu["import boto3"]),
            "cpu_samples_ms": cpu[name],
            "wall_ratio_to_boto3": ms / baseline,
            "ratio_to_boto3": ratio,
            "within_2_5x": ratio <= BOTO3_LIMIT_RATIO,
            "imports_stripe": imports_stripe,
            "may_import_stripe": name in STRIPE_FUNCTIONS,
            "stripe_ok": imports_stripe is False or name in STRIPE_FUNCTIONS,
            "packages": facts[name]["packages"],
            "imports_boto3": "boto3" in facts[name]["packages"],
            "user_credits_modules": facts[name]["user_credits_modules"],
            "modules_loaded": facts[name]["modules"],
            "package_ms": costs[name],
        })
    return {
        "runs": runs,
        "boto3_median_ms": baseline,
        "boto3_samples_ms": samples["import boto3"],
        "boto3_cpu_median_ms": baseline_cpu,
        "boto3_cpu_samples_ms": cpu["import boto3"],
        "boto3_package_ms": costs["import boto3"],
        "functions": rows,
        "sizes": sizes(),
    }


def markdown(result: dict[str, Any]) -> str:
    base = result["boto3_median_ms"]
    out = [
        f"Median of {result['runs']} fresh interpreters each; import time measured inside the interpreter "
        f"(wall clock and CPU time). Baseline `import boto3`: **{base:.0f} ms wall, "
        f"{result['boto3_cpu_median_ms']:.0f} ms CPU**. Target: every handler <= {BOTO3_LIMIT_RATIO}x boto3, "
        "judged on CPU time (wall time on this shared machine includes waiting for a CPU); only CreateOrder "
        "and StripeWebhook may import `stripe`.",
        "",
    ]
    rows = []
    for row in result["functions"]:
        if not row["measured"]:
            rows.append([row["function"], row["code_uri"], "not measured (handler missing)", "-", "-", "-", "-", "-",
                         "-", "-", "-"])
            continue
        rows.append([
            row["function"],
            row["code_uri"],
            f"{row['median_ms']:.0f} ({row['min_ms']:.0f}-{row['max_ms']:.0f})",
            f"{row['wall_ratio_to_boto3']:.2f}x",
            f"{row['cpu_median_ms']:.0f}",
            f"{row['ratio_to_boto3']:.2f}x",
            f"{row['cpu_min_ratio_to_boto3']:.2f}x",
            "met" if row["within_2_5x"] else "**NOT MET**",
            ("yes" if row["imports_stripe"] else "no") + ("" if row["stripe_ok"] else " **(should not)**"),
            "yes" if row["imports_boto3"] else "no",
            row["modules_loaded"],
        ])
    out.append(markdown_table(
        ["function", "CodeUri", "wall ms median (min-max)", "wall x boto3", "CPU ms median", "CPU x boto3",
         "CPU x boto3 (min/min)", "<= 2.5x (CPU median)", "imports stripe", "imports boto3", "modules loaded"], rows,
    ))
    out += ["", "Where the time goes: ms per package (sum of its modules' self times in one `-X importtime` run, "
            "which itself inflates the total; `other` is mostly the standard library):", ""]
    columns = [*WATCHED, "other", "total"]
    cost_rows = [["import boto3", *[result["boto3_package_ms"].get(p) for p in columns]]]
    cost_rows += [[r["function"], *[r["package_ms"].get(p) for p in columns]] for r in result["functions"]
                  if r["measured"]]
    out.append(markdown_table(["function", *columns], [[c[0], *[fmt_ms(v) for v in c[1:]]] for c in cost_rows]))
    sz = result["sizes"]
    out += ["", "Installed size (source files, `__pycache__` excluded):", ""]
    size_rows = [[f["function"], f["code_uri"], _size(f["bytes"])] for f in sz["functions"]]
    size_rows.append(["layer: user_credits", "shared/user_credits", kib(sz["user_credits_bytes"])])
    for dep in sz["dependencies"]:
        if not dep["in_lambda_runtime"]:
            size_rows.append([f"layer: {dep['distribution']} {dep['version']}", f"via {dep['pulled_in_by']}",
                              kib(dep["bytes"])])
    size_rows.append(["**layer total** (without the runtime's boto3 set)", "", kib(sz["layer_bytes_without_runtime"])])
    for dep in sz["boto3_runtime_set"]:
        size_rows.append([f"runtime: {dep['distribution']} {dep['version']}", "in the Lambda runtime",
                          kib(dep["bytes"])])
    size_rows.append(["boto3 set total (not shipped if the layer build excludes it)", "", kib(sz["boto3_set_bytes"])])
    out.append(markdown_table(["what", "where", "size"], size_rows))
    return "\n".join(out)


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _size(size: int) -> str:
    return f"{size:,} B" if size < 10 * 1024 else kib(size)


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(REPO_ROOT))
    outcome = run(runs=3)
    print(markdown(outcome))
