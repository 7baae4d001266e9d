"""A real ``redis-server`` for the tests, on 127.0.0.1 on a free port with its own folder and the append-only file on,
stopped after; shared by the library's and the applications' tests.

Without ``redis-server`` or redis-py the tests that need them skip, saying what to install; with
``SIRLLM_REQUIRE_REDIS=1`` (set by ``.ci/run``) they fail instead, so CI never passes by skipping them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRED = os.environ.get("SIRLLM_REQUIRE_REDIS") == "1"


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason``, or fail with it where CI requires the real parts."""
    if REQUIRED:
        pytest.fail(f"{reason} (SIRLLM_REQUIRE_REDIS=1: CI must run these tests)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process (``appendfsync``: the append-only file's ``fsync`` policy; ``always`` loses no
    acknowledged write); :meth:`restart` stops it cleanly and starts it again on the same port and
    folder, so what it had written (the append-only file) is all it knows."""

    def __init__(self, folder: Path, appendfsync: str = "always"):
        self.folder, self.port, self.appendfsync = folder, free_port(), appendfsync
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.folder)]
        command += ["--appendonly", "yes", "--appendfsync", self.appendfsync, "--maxmemory-policy", "noeviction"]
        command += ["--save", "", "--protected-mode", "yes"]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"redis-server exited: {self.process.stderr.read().decode()[-2000:]}"
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.05)
        raise AssertionError(f"redis-server did not answer on port {self.port} within 20 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # redis-server flushes its append-only file and exits
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def redis_server(folder: Path) -> Iterator[RedisServer]:
    """A started :class:`RedisServer` in ``folder``, stopped afterwards; skips (or fails, see the module docstring)
    without ``redis-server`` or redis-py."""
    if shutil.which("redis-server") is None:
        skip_or_fail("redis-server is not installed (apt-get install redis-server)")
    try:
        import redis  # noqa: F401
    except ImportError:
        skip_or_fail('redis-py is not installed (pip install "sirllm-agents[redis]")')
    server = RedisServer(folder)
    server.start()
    try:
        yield server
    finally:
        server.stop()
