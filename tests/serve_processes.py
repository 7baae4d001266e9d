"""``sirllm-agents serve`` replicas as processes of their own, for the tests (and benchmarks) that run several of them
against one session store (a folder or Redis), and vllm-router in front of them."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from redis_fixtures import free_port


def wait_until_up(url: str, process: subprocess.Popen | None = None, timeout: float = 90) -> None:
    """Returns once ``url``'s ``/health`` answers 200; fails when ``process`` exits first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, f"{url} exited: {process.stderr.read().decode()[-2000:]}"
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
    3 s leases; yields (base URL, process); stopped with SIGTERM (and continued first, should a test have left it
    stopped)."""
    port = free_port()
    command = [sys.executable, "-m", "sirllm_agents_apps.cli", "serve", "--port", str(port)]
    command += ["--model", str(model_dir)] if model_dir is not None else []
    command += ["--session-store", str(store), "--replica-name", name, "--lease-seconds", "3", *extra]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def router_command() -> str | None:
    """vllm-router's launcher: on the PATH, or beside this Python (its wheel installs it there); None without it."""
    beside = Path(sys.executable).with_name("vllm-router")
    return shutil.which("vllm-router") or (str(beside) if beside.exists() else None)


@contextlib.contextmanager
def vllm_router(workers: list[str]) -> Iterator[str]:
    """vllm-router on 127.0.0.1 in front of ``workers``, hashing the ``X-Session-Id`` header; yields its URL."""
    launcher = router_command()
    assert launcher is not None, "vllm-router is not installed (pip install vllm-router)"
    port = free_port()
    command = [launcher, "--host", "127.0.0.1", "--port", str(port), "--policy", "consistent_hash"]
    command += ["--log-level", "warning", "--worker-urls", *workers]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process, timeout=30)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
