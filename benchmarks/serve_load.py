"""Load test of a running ``flashdecode serve``: many concurrent streaming clients, some hanging up
mid-stream, with ``/health`` polled throughout (issue: OpenAI-compatible server).

    flashdecode serve --port 8000 --max-model-len 512 &
    python benchmarks/serve_load.py --base-url http://127.0.0.1:8000 --model SmolLM2-135M-Instruct \\
        --clients 200 --hang-up 0.25 --max-tokens 16

All clients start at once. Each hanging-up client closes its connection after 0 to 3 text chunks (0:
while its request is still queued or in prefill); every other client must read a stream that ends
with ``max_tokens`` tokens of content (greedy, EOS ignored: ``flashdecode bench serve``'s requests and
client). A thread of its own polls ``/health`` every 20 ms over its own connection while the load
runs; its p95 latency must be within ``--health-p95-ms``. Afterwards ``num_requests_running`` and
``kv_cache_usage_perc`` must return to 0 (every aborted request freed its KV blocks). Prints a JSON
report (also to ``--json``); the exit status is 1 if a client was lost, the server kept blocks, or
``/health`` was too slow.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from flashdecode.tools.bench_serve import chunk_text, make_prompts, one_request, percentiles, request_body

HEALTH_PERIOD_S = 0.02
IDLE_TIMEOUT_S = 30.0
IDLE_METRICS = ("num_requests_running", "kv_cache_usage_perc")  # 0 once every request has ended


def server_metric(base_url: str, name: str) -> float:
    """The value of the unlabelled-or-single-series gauge ``flashdecode:NAME`` in ``/metrics``."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"flashdecode:{name}":
                return sample.value
    raise KeyError(f"flashdecode:{name} is not in {base_url}/metrics")


class HealthPoller(threading.Thread):
    """``GET /health`` every ``HEALTH_PERIOD_S`` until stopped: each answer's latency and status."""

    def __init__(self, base_url: str):
        super().__init__(daemon=True)
        self.url = f"{base_url}/health"
        self.latencies_s: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    status = client.get(self.url).status_code
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                else:
                    self.latencies_s.append(time.perf_counter() - start)
                    if status != 200:
                        self.failures.append(f"HTTP {status}")
                self.stop.wait(HEALTH_PERIOD_S)


async def hang_up(client: httpx.AsyncClient, url: str, body: dict[str, Any], after_chunks: int) -> str | None:
    """Reads ``after_chunks`` text chunks of a stream, then closes the connection mid-stream (httpx
    closes a connection whose response was not read to the end). None, or what went wrong."""
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                return f"HTTP {response.status_code}"
            if after_chunks == 0:
                return None
            seen = 0
            async for line in response.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else ""
                if data and data != "[DONE]" and chunk_text(json.loads(data)):
                    seen += 1
                    if seen == after_chunks:
                        return None
            return "the stream ended before the client hung up"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"


async def _clients(args: argparse.Namespace, url: str, hang_ups: dict[int, int]) -> list[Any]:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    bodies = [request_body(args, p) for p in make_prompts(args.clients, args.prompt_len, args.seed)]
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=args.timeout) as client:
        return await asyncio.gather(
            *(
                hang_up(client, url, body, hang_ups[i]) if i in hang_ups else one_request(client, url, body)
                for i, body in enumerate(bodies)
            )
        )


def _wait_idle(base_url: str) -> dict[str, float]:
    deadline = time.monotonic() + IDLE_TIMEOUT_S
    while True:
        state = {
            name: server_metric(base_url, name) for name in ("num_requests_running", "kv_cache_usage_perc")
        }
        if not any(state.values()) or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


def run_load(args: argparse.Namespace) -> dict[str, Any]:
    """The load test against ``args.base_url``; the report, with ``ok`` saying whether it passed."""
    base = args.base_url.rstrip("/")
    url = base + ("/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions")
    rng = random.Random(args.seed)
    chosen = rng.sample(range(args.clients), round(args.hang_up * args.clients))
    hang_ups = {i: rng.randint(0, 3) for i in chosen}
    poller = HealthPoller(base)
    poller.start()
    start = time.perf_counter()
    try:
        results = asyncio.run(_clients(args, url, hang_ups))
    finally:
        poller.stop.set()
        poller.join()
    duration = time.perf_counter() - start
    finished = [r for i, r in enumerate(results) if i not in hang_ups]
    lost = [r for r in finished if not r.ok or r.output_tokens != args.max_tokens]
    hang_up_errors = [results[i] for i in hang_ups if results[i] is not None]
    health = percentiles(poller.latencies_s, points=(50, 95, 99))
    idle = _wait_idle(base)
    report = {
        "clients": args.clients,
        "hung_up": len(hang_ups),
        "completed": len(finished) - len(lost),
        "lost": len(lost),
        "lost_samples": sorted({r.error or f"{r.output_tokens} tokens" for r in lost})[:5],
        "hang_up_errors": sorted(set(hang_up_errors))[:5],
        "max_tokens": args.max_tokens,
        "duration_s": duration,
        "ttft_ms": percentiles([r.ttft_s for r in finished if r.ttft_s is not None]),
        "e2e_ms": percentiles([r.e2e_s for r in finished if r.ok]),
        "health": {"polls": len(poller.latencies_s), "failures": poller.failures[:5], "latency_ms": health},
        "health_p95_budget_ms": args.health_p95_ms,
        "after": idle,
    }
    report["ok"] = (
        not lost
        and not hang_up_errors
        and not poller.failures
        and not any(idle.values())
        and health["p95"] is not None
        and health["p95"] <= args.health_p95_ms
    )
    return report


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model name requests carry")
    p.add_argument("--clients", type=int, default=200, help="concurrent streaming clients")
    p.add_argument("--hang-up", type=float, default=0.25, help="fraction of clients that hang up mid-stream")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens each request generates")
    p.add_argument("--prompt-len", type=int, default=16, help="prompt length in words (about tokens)")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="chat")
    p.add_argument("--api-key", default=None, help="bearer key, if the server has one")
    p.add_argument("--health-p95-ms", type=float, default=100.0, help="the /health p95 latency budget")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompts and of who hangs up")
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report here")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args()
    if args.clients < 1 or args.max_tokens < 1 or not 0 <= args.hang_up < 1:
        parser.error("--clients and --max-tokens must be positive and --hang-up in [0, 1)")
    report = run_load(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
