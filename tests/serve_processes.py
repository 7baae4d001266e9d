"""``sirllm-agents serve`` replicas as processes of their own, for the tests (and benchmarks) that run several of them
against one session store (a folder or Redis), and vllm-router in front of them."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import httpx
from redis_fixtures import free_port


def wait_until_up(
    url: str, process: subprocess.Popen | None = None, log: IO[bytes] | None = None, timeout: float = 90
) -> None:
    """Returns once ``url``'s ``/health`` answers 200; fails when ``process`` exits first (quoting the end of its
    ``log``) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, f"{url} exited: {_tail(log)}"
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise AssertionError(f"{url} did not come up in {timeout} s")


@contextlib.contextmanager
def replica(
    model_dir: Path | None, store: str | Path, name: str, *extra: str
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``sirllm-agents serve`` of ``model_dir`` (None: the embedded model) on ``store`` as a process of its own, with
    3 s leases; yields (base URL, process)."""
    port = free_port()
    command = [sys.executable, "-m", "sirllm_agents_apps.cli", "serve", "--port", str(port)]
    command += ["--model", str(model_dir)] if model_dir is not None else []
    command += ["--session-store", str(store), "--replica-name", name, "--lease-seconds", "3", *extra]
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log, _running(command, url, log, up_within=90) as process:
        yield url, process


def router_command() -> str | None:
    """vllm-router's launcher: on the PATH, or beside this Python (its wheel installs it there); None without it."""
    beside = Path(sys.executable).with_name("vllm-router")
    return shutil.which("vllm-router") or (str(beside) if beside.exists() else None)


@contextlib.contextmanager
def vllm_router(workers: list[str], *options: str, log: IO[bytes] | None = None) -> Iterator[str]:
    """vllm-router on 127.0.0.1 in front of ``workers``, hashing the ``X-Session-Id`` header, with its other
    ``options``, logging to ``log`` (default: a temporary file); yields its URL."""
    launcher = router_command()
    assert launcher is not None, "vllm-router is not installed (pip install vllm-router)"
    port = free_port()
    command = [launcher, "--host", "127.0.0.1", "--port", str(port), "--policy", "consistent_hash"]
    command += ["--log-level", "warning", *options, "--worker-urls", *workers]
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        log = log or stack.enter_context(tempfile.TemporaryFile())
        stack.enter_context(_running(command, url, log, up_within=30))
        yield url


@contextlib.contextmanager
def _running(command: list[str], url: str, log: IO[bytes], up_within: float) -> Iterator[subprocess.Popen]:
    """``command`` as a process writing to ``log`` (a file: a pipe nobody reads would fill up and block it), once
    ``url`` is up; stopped with SIGTERM afterwards (continued first, should a test have left it stopped)."""
    process = subprocess.Popen(command, stdout=log, stderr=log)
    try:
        wait_until_up(url, process, log, up_within)
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _tail(log: IO[bytes] | None) -> str:
    if log is None:
        return "(no log)"
    log.seek(0)
    return log.read().decode(errors="replace")[-2000:]
