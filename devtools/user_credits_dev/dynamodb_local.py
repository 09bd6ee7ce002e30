"""AWS's DynamoDB Local, taken from the npm package `amplify-dynamodb-simulator` and run with java."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

from user_credits_dev.template import REPO_ROOT

PACKAGE = "amplify-dynamodb-simulator"
PACKAGE_VERSION = "2.9.30"
CACHE_DIR = Path(os.environ.get("USER_CREDITS_CACHE", REPO_ROOT / ".cache"))
EMULATOR_DIR = CACHE_DIR / "dynamodb-local"


def ensure_jar() -> Path:
    """`npm pack` the simulator once and keep its emulator/ folder in .cache/."""
    jar = EMULATOR_DIR / "DynamoDBLocal.jar"
    if jar.exists():
        return jar
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is needed to fetch DynamoDB Local (package amplify-dynamodb-simulator)")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        subprocess.run(
            [npm, "pack", f"{PACKAGE}@{PACKAGE_VERSION}", "--silent"], cwd=tmp, check=True,
            stdout=subprocess.DEVNULL,
        )
        tgz = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(tgz) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/emulator/")]
            archive.extractall(tmp, members=members, filter="data")
        staging = Path(tmp) / "package" / "emulator"
        if EMULATOR_DIR.exists():
            shutil.rmtree(EMULATOR_DIR)
        shutil.move(str(staging), str(EMULATOR_DIR))
    return jar


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"DynamoDB Local exited with code {process.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"DynamoDB Local did not listen on port {port} within {timeout}s")


class DynamoDBLocal:
    """One DynamoDB Local process on 127.0.0.1; in memory, or persisted in `data_dir`."""

    def __init__(self, port: int | None = None, data_dir: Path | None = None) -> None:
        self.port = port or free_port()
        self.data_dir = data_dir
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> DynamoDBLocal:
        jar = ensure_jar()
        java = shutil.which("java")
        if java is None:
            raise RuntimeError("java is needed to run DynamoDB Local")
        storage = ["-inMemory"] if self.data_dir is None else ["-dbPath", str(self.data_dir)]
        if self.data_dir is not None:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [java, "-Xmx512m", f"-Djava.library.path={jar.parent / 'DynamoDBLocal_lib'}", "-jar", str(jar),
             *storage, "-sharedDb", "-disableTelemetry", "-port", str(self.port)],
            cwd=jar.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.process = None
