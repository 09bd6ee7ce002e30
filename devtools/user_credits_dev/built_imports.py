"""Import every built function as Lambda would: python3.13, only the function's folder and the layer on
the path (the layer carries boto3), nothing of the repository or the dev venv (issue 14).

    python3.13 -I devtools/user_credits_dev/built_imports.py BUILD_DIR [--runs N]

BUILD_DIR is `sam build`'s output. Each import runs in a fresh interpreter (a cold start) with an empty
environment but for the settings the template gives every function; it prints the import time of each
handler beside `import boto3` from the same layer, and exits 1 if any import fails. Standard library
only: this runs outside every venv.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

PROBE = (
    "import sys, time; sys.path[:0] = {paths!r}; started = time.perf_counter(); import {module}; "
    "print(time.perf_counter() - started); "
    "assert all(not p.startswith({repo!r}) for p in sys.path if p not in {paths!r}), sys.path; "
    "origin = sys.modules['user_credits'].__file__ if 'user_credits' in sys.modules else {layer!r}; "
    "assert origin.startswith({layer!r}), origin"
)
ENVIRONMENT = {
    "POWERTOOLS_SERVICE_NAME": "user-credits", "POWERTOOLS_METRICS_NAMESPACE": "UserCredits",
    "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1", "LANG": "C.UTF-8",
}


def cold_import(python: str, module: str, paths: list[str], layer: str, repo: str) -> float:
    code = PROBE.format(paths=paths, module=module, repo=repo, layer=layer)
    done = subprocess.run([python, "-I", "-c", code], env=ENVIRONMENT, capture_output=True, text=True, timeout=120,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"import {module} from {paths[0]} failed:\n{done.stderr.strip()}")
    return float(done.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    build = Path(argv[1]).resolve()
    runs = int(argv[argv.index("--runs") + 1]) if "--runs" in argv else 3
    repo = str(Path(__file__).resolve().parents[2])
    layer = str(build / "CoreLayer" / "python")
    functions = sorted(p for p in build.iterdir() if (p / "app.py").exists())
    if not functions or not Path(layer).is_dir():
        print(f"no built functions or layer under {build}", file=sys.stderr)
        return 1
    python = sys.executable
    results: dict[str, float] = {}
    try:
        results["import boto3 (the layer's)"] = statistics.median(
            cold_import(python, "boto3", [layer], layer, repo) for _ in range(runs))
        for function in functions:
            results[function.name] = statistics.median(
                cold_import(python, "app", [str(function), layer], layer, repo) for _ in range(runs))
    except RuntimeError as failure:
        print(failure, file=sys.stderr)
        return 1
    version = ".".join(map(str, sys.version_info[:3]))
    print(json.dumps({"python": version, "runs": runs, "seconds": {k: round(v, 4) for k, v in results.items()}},
                     indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
