"""``flashdecode bench serve``: a load generator for any OpenAI-compatible endpoint (``flashdecode serve``,
``vllm serve``, ``llama-server``), over HTTP only, so every server is measured the same way.

At each concurrency level, ``num_prompts`` streaming requests run with at most ``concurrency`` in flight.
A request's time to first token (TTFT) is from sending it to its first chunk with text; its inter-token
latencies (ITL) are the gaps between later chunks with text (servers send one token a chunk; one that
batches tokens into chunks shows longer, fewer gaps). Output tokens are the server's own
``usage.completion_tokens`` (``stream_options.include_usage``) where it sends them, else the text chunks.
Request throughput and output tokens/s are over the level's wall time. Prompts are ``prompt_len``
random common words (about one token each in most vocabularies; the server's ``usage`` gives the exact
count, reported as ``prompt_tokens``). Requests ask for greedy decoding with EOS ignored (``ignore_eos``,
which vLLM, llama-server and flashdecode accept), so every request generates ``max_tokens``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from ..errors import FlashDecodeError
from ..utils.formatting import format_table, parse_int_list
from ..utils.paths import write_report

_WORDS = (
    "time year people way day man thing woman life child world school state family student group country "
    "problem hand part place case week company system program question work government number night point "
    "home water room mother area money story fact month lot right study book eye job word business issue "
    "side kind head house service friend father power hour game line end member law car city community name"
).split()
_PERCENTILES = (50, 90, 99)
_ERROR_SAMPLES = 5


@dataclass
class RequestResult:
    ok: bool
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    e2e_s: float = 0.0
    prompt_tokens: int | None = None
    output_tokens: int = 0
    error: str | None = None


def make_prompts(num: int, prompt_len: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(prompt_len)) for _ in range(num)]


def percentiles(
    values: list[float], scale: float = 1000.0, points: tuple[int, ...] = _PERCENTILES
) -> dict[str, float | None]:
    """The ``points`` percentiles (p50/p90/p99) and the mean of ``values`` (seconds) in milliseconds;
    None where there are none."""
    if not values:
        return {**{f"p{p}": None for p in points}, "mean": None}
    ordered = sorted(values)
    out: dict[str, float | None] = {}
    for p in points:
        # nearest rank: a percentile is a value that was measured
        rank = max(1, -(-p * len(ordered) // 100))
        out[f"p{p}"] = ordered[rank - 1] * scale
    out["mean"] = statistics.fmean(ordered) * scale
    return out


def chunk_text(chunk: dict[str, Any]) -> str:
    text = ""
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta")
        text += (delta.get("content") or "") if delta is not None else (choice.get("text") or "")
    return text


async def one_request(client: Any, url: str, body: dict[str, Any]) -> RequestResult:
    start = time.perf_counter()
    result = RequestResult(ok=False)
    chunks, last = 0, None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message", chunk["error"]))[:200]
                    return result
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens")
                    result.output_tokens = usage.get("completion_tokens") or 0
                if chunk_text(chunk):
                    now = time.perf_counter()
                    if last is None:
                        result.ttft_s = now - start
                    else:
                        result.itl_s.append(now - last)
                    last, chunks = now, chunks + 1
    except Exception as exc:  # noqa: BLE001 - any failure of one request is counted, not raised
        result.error = f"{type(exc).__name__}: {exc}"[:200]
        return result
    result.e2e_s = time.perf_counter() - start
    result.output_tokens = result.output_tokens or chunks
    result.ok = result.ttft_s is not None
    if not result.ok:
        result.error = "the stream ended without any text"
    return result


def request_body(args: argparse.Namespace, prompt: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


async def run_level(
    client: Any, url: str, bodies: list[dict[str, Any]], concurrency: int, bar: tqdm
) -> dict[str, Any]:
    gate = asyncio.Semaphore(concurrency)

    async def gated(body: dict[str, Any]) -> RequestResult:
        async with gate:
            result = await one_request(client, url, body)
        bar.update(1)
        return result

    start = time.perf_counter()
    results = await asyncio.gather(*(gated(b) for b in bodies))
    return summarize(results, concurrency, time.perf_counter() - start)


def summarize(results: list[RequestResult], concurrency: int, duration_s: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    return {
        "concurrency": concurrency,
        "requests": len(results),
        "completed": len(done),
        "errors": len(failed),
        "error_samples": sorted({r.error or "" for r in failed})[:_ERROR_SAMPLES],
        "duration_s": duration_s,
        "request_throughput": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        "prompt_tokens_mean": statistics.fmean(prompt_tokens) if prompt_tokens else None,
        "ttft_ms": percentiles([r.ttft_s for r in done if r.ttft_s is not None]),
        "itl_ms": percentiles([gap for r in done for gap in r.itl_s]),
        "e2e_ms": percentiles([r.e2e_s for r in done]),
    }


async def run_bench_serve(
    args: argparse.Namespace, levels: list[int], progress: bool
) -> list[dict[str, Any]]:
    import httpx

    url = args.base_url.rstrip("/") + (
        "/v1/chat/completions" if args.endpoint == "chat" else "/v1/completions"
    )
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=max(levels), max_keepalive_connections=max(levels))
    timeout = httpx.Timeout(args.timeout, connect=min(args.timeout, 30.0))
    prompts = make_prompts(args.num_prompts, args.prompt_len, args.seed)
    bodies = [request_body(args, p) for p in prompts]
    reports = []
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=timeout) as client:
        with tqdm(total=len(levels) * len(bodies), disable=not progress, unit="req", file=sys.stderr) as bar:
            for c in levels:
                bar.set_description(f"concurrency {c}")
                reports.append(await run_level(client, url, bodies, c, bar))
    return reports


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(levels: list[dict[str, Any]]) -> str:
    headers = ["conc", "ok", "err", "req/s", "out tok/s"]
    headers += [f"TTFT p{p} ms" for p in _PERCENTILES] + [f"ITL p{p} ms" for p in _PERCENTILES]
    rows = []
    for r in levels:
        row = [str(r["concurrency"]), str(r["completed"]), str(r["errors"])]
        row += [f"{r['request_throughput']:.2f}", f"{r['output_tokens_per_s']:.1f}"]
        row += [_ms(r["ttft_ms"][f"p{p}"]) for p in _PERCENTILES]
        row += [_ms(r["itl_ms"][f"p{p}"]) for p in _PERCENTILES]
        rows.append(row)
    return format_table(headers, rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model name requests carry")
    p.add_argument("--concurrency", default="1,8,32,128", help="requests in flight, comma-separated levels")
    p.add_argument("--num-prompts", type=int, default=128, help="requests at each concurrency level")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt length in words (about tokens)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    p.add_argument("--api-key", default=None, help="bearer key (default: $OPENAI_API_KEY)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one request may take")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--json", default=None, metavar="FILE", help="write the report here")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    levels = parse_int_list(args.concurrency, "--concurrency")
    for name in ("num_prompts", "prompt_len", "max_tokens"):
        if getattr(args, name) < 1:
            raise FlashDecodeError(f"--{name.replace('_', '-')} must be a positive integer")
    if args.api_key is None:
        args.api_key = os.environ.get("OPENAI_API_KEY")
    try:
        import httpx  # noqa: F401 - checked here for a clear message
    except ImportError:
        raise FlashDecodeError("bench serve needs httpx: pip install httpx") from None
    report = {
        "base_url": args.base_url,
        "model": args.model,
        "endpoint": args.endpoint,
        "num_prompts": args.num_prompts,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "command": "flashdecode " + " ".join(sys.argv[1:]) if sys.argv else "",
        "levels": asyncio.run(run_bench_serve(args, levels, progress=not args.no_progress)),
    }
    print(format_report(report["levels"]))
    if args.json:
        write_report(args.json, report)
        print(f"\nwrote {args.json}")
    return 0
