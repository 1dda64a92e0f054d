"""Load test of `chatforge serve` on loopback: one streaming client, then 32 at once, against the same server
in the same run. Reports requests/s, completion tokens/s, p50/p95 time-to-first-token and latency, and
errors; the ratio of the two tokens/s figures is what continuous batching buys.

    python bench/serve_load.py                  # runs/demo/pretrain, 1 client for 20 s, then 32 for 60 s
    python bench/serve_load.py --run runs/demo/sft --clients 32 --seconds 60

The default model is the demo's base model: it does not stop early, so every reply is --max-tokens long
and every request does the same work (the role of `ignore_eos` in vLLM's benchmark_serving). The SFT
model's replies end after ~11 tokens, so there prefilling the ~30-token prompts is most of the work.

Stops by itself: no new request starts after the phase's time is up, and requests in flight then finish
(each is capped by --max-tokens). Goal (the serving issue): 0 errors, and tokens/s at 32 clients at least
5x a single client's. A benchmark, not a test: it prints the figures and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["Write a line of verse that uses the word 'sea'.", "写一句关于春天的诗。", "Tell me about the king.",
           "Write a line of verse that ends with the word 'night'.", "用“月”字写一句诗。", "What is love?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def client_loop(http: httpx.AsyncClient, url: str, model: str, until: float, max_tokens: int, seed: int,
                      results: list) -> None:
    """Stream requests one after another until `until`; one result row per request."""
    i = seed
    while time.perf_counter() < until:
        body = {"model": model, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0.8, "stream": True,
                "stream_options": {"include_usage": True}}
        i += 1
        start, first, tokens, error = time.perf_counter(), None, 0, None
        try:
            async with http.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    error = f"HTTP {r.status_code}"
                    await r.aread()
                else:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                            first = time.perf_counter() - start
                        if chunk.get("usage"):
                            tokens = chunk["usage"]["completion_tokens"]
        except httpx.HTTPError as e:
            error = type(e).__name__
        results.append({"ttft": first, "latency": time.perf_counter() - start, "tokens": tokens, "error": error})


async def phase(url: str, model: str, clients: int, seconds: float, max_tokens: int) -> dict:
    results: list = []
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as http:
        start = time.perf_counter()
        until = start + seconds
        await asyncio.gather(*(client_loop(http, url, model, until, max_tokens, c, results) for c in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    ttft = sorted(r["ttft"] for r in ok if r["ttft"] is not None)
    latency = sorted(r["latency"] for r in ok)

    def pct(xs: list[float], q: float) -> float:
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")

    return {"clients": clients, "seconds": round(wall, 1), "requests": len(results), "errors": len(results) - len(ok),
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95), "latency_p50": pct(latency, 0.5),
            "latency_p95": pct(latency, 0.95), "mean_tokens": statistics.mean(r["tokens"] for r in ok) if ok else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default=str(REPO / "runs" / "demo" / "pretrain"),
                        help="model run folder (default: the demo's base model)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the many-clients phase")
    parser.add_argument("--single-seconds", type=float, default=20.0, help="length of the one-client phase")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32", help="the server's --dtype")
    args = parser.parse_args()
    if not (Path(args.run) / "model.json").is_file():
        sys.exit(f"{args.run}: no chat model here; run `make demo` first or pass --run")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "chatforge", "serve", "--run", f"chat={args.run}", "--port", str(port),
               "--max-batch", str(args.clients), "--max-concurrent", str(2 * args.clients), "--dtype", args.dtype]
    server = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.time() + 60
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                sys.exit("the server did not start")
            time.sleep(0.2)
        print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
              f"{args.run}, {args.dtype}, max_tokens {args.max_tokens}, temperature 0.8, streaming, loopback")
        one = asyncio.run(phase(url, "chat", 1, args.single_seconds, args.max_tokens))
        engine_one = httpx.get(f"{url}/health").json()["models"]["chat"]
        many = asyncio.run(phase(url, "chat", args.clients, args.seconds, args.max_tokens))
        engine_all = httpx.get(f"{url}/health").json()["models"]["chat"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    print("| clients | requests | errors | requests/s | tokens/s | TTFT p50 / p95 | latency p50 / p95 | tokens/reply |")
    print("|---|---|---|---|---|---|---|---|")
    for r in (one, many):
        print(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} "
              f"| {r['tokens_per_s']:.0f} | {r['ttft_p50'] * 1000:.0f} / {r['ttft_p95'] * 1000:.0f} ms "
              f"| {r['latency_p50']:.2f} / {r['latency_p95']:.2f} s | {r['mean_tokens']:.1f} |")
    for r, (before, after) in ((one, ({}, engine_one)), (many, (engine_one, engine_all))):
        steps = after["decode_steps"] - before.get("decode_steps", 0)
        print(f"engine, {r['clients']} client(s): {steps} decode steps, "
              f"{after['prefills'] - before.get('prefills', 0)} prefills, busy "
              f"{(after['busy_seconds'] - before.get('busy_seconds', 0)) / r['seconds']:.0%} of the time")
    ratio = many["tokens_per_s"] / max(one["tokens_per_s"], 1e-9)
    errors = one["errors"] + many["errors"]
    print(f"tokens/s at {args.clients} clients = {ratio:.1f}x one client's (goal >= 5x): "
          f"{'met' if ratio >= 5 else 'NOT met'}; errors {errors} (goal 0): {'met' if errors == 0 else 'NOT met'}")


if __name__ == "__main__":
    main()
