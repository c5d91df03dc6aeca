"""A real ``flashdecode serve`` process on a free local port, for the tests that talk to it over HTTP
(tests/test_server.py, tests/test_chat_page.py, tests/test_server_fuzz.py)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


@dataclass
class Server:
    base: str
    process: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """``flashdecode serve ARGS --port <free>``, yielded once ``/health`` answers 200; its output goes
    to ``log``. Fails the test with the log if it exits or is not healthy within two minutes."""
    port = free_port()
    cmd = [sys.executable, "-m", "flashdecode", "serve", "--port", str(port), *args]
    env = {**os.environ, **(env or {})}
    with open(log, "wb") as out:
        process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not become healthy:\n{log.read_text()}")
            time.sleep(0.2)
        yield Server(base, process, log)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metric(server: Server, name: str) -> float:
    """The value of ``flashdecode:NAME`` in the server's ``/metrics``."""
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    match = re.search(rf"^flashdecode:{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"flashdecode:{name} not in /metrics"
    return float(match.group(1))
