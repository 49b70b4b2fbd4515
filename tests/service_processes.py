"""The real service system for integration tests: settings on the test servers, and ``dosebench``
subprocesses (workers, beat) in their own process groups, each logging to a file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dosebench.core.db import upgrade_database
from dosebench.core.settings import Settings


def start_service(postgres_url: str, redis_url: str, broker_key_prefix: str, storage: Path, logs: Path,
                  **overrides: str) -> dict:
    """Migrate the database, point this process's Celery app at the test servers and return
    ``{"settings", "env", "storage", "logs"}``: ``env`` is the environment for ``dosebench`` subprocesses
    (``DOSEBENCH_<NAME>`` for each setting; ``overrides`` use the settings' upper-case names). Call
    :func:`stop_service` afterwards."""
    env_values = {"DATABASE_URL": postgres_url, "BROKER_URL": redis_url, "BROKER_KEY_PREFIX": broker_key_prefix,
                  "STORAGE_URL": "file://" + str(storage), **overrides}
    settings = Settings(**{k.lower(): v for k, v in env_values.items()})
    upgrade_database(postgres_url)
    from dosebench.core import celery_app

    celery_app.configure(settings)
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{f"DOSEBENCH_{k}": v for k, v in env_values.items()})
    return {"settings": settings, "env": env, "storage": storage, "logs": logs}


def stop_service() -> None:
    from dosebench.core import celery_app

    celery_app.configure()  # back to the environment's settings


class CliProcess:
    """``python -m dosebench.cli ARGS`` in its own process group (a signal reaches every process of it,
    prefork children included), stdout and stderr in ``logs/<name>-<n>.log``."""

    def __init__(self, service: dict, name: str, *args: str) -> None:
        self.log = service["logs"] / f"{name}-{time.monotonic_ns()}.log"
        self._handle = self.log.open("wb")
        self.process = subprocess.Popen([sys.executable, "-m", "dosebench.cli", *args], env=service["env"],
                                        cwd=service["logs"], stdout=self._handle, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=20)
        self._handle.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@contextmanager
def embedded_server(home: Path, log_path: Path) -> Iterator[str]:
    """``dosebench serve --embedded --home HOME`` on a free loopback port, with none of this process's
    DOSEBENCH_* settings; yields its base URL once ``/v1/healthz`` answers 200, stops it afterwards."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOSEBENCH_")}
    with log_path.open("w") as log:
        server = subprocess.Popen([sys.executable, "-m", "dosebench.cli", "serve", "--embedded", "--home", str(home),
                                   "--port", str(port), "--log-level", "warning"], env=env,
                                  stdout=log, stderr=subprocess.STDOUT, text=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/v1/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the embedded server did not start:\n{log_path.read_text()}")
                time.sleep(0.2)
            yield base
        finally:
            server.terminate()
            server.wait(timeout=30)
