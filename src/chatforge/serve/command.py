"""`chatforge serve`: its flags; the server is serve/server.py, the engine serve/engine.py."""

from __future__ import annotations

import argparse


def cmd_serve(args: argparse.Namespace) -> None:
    import os

    from chatforge.serve.server import serve

    serve(args.run, args.host, args.port, args.api_key or os.environ.get("CHATFORGE_API_KEY"), args.max_batch,
          args.max_pending, args.max_body_bytes, args.dtype)


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API and a web chat page with an arena",
                       description="Serve chat models over an OpenAI-compatible API (/v1/chat/completions, "
                       "/v1/completions, /v1/models; streaming) and a web chat page at /. Requests share each "
                       "model through continuous batching.")
    p.add_argument("--run", action="append", required=True, metavar="[NAME=]DIR",
                   help="a chat model's run folder, or a folder of runs (runs/demo serves every model in it); "
                   "repeat for more models")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (or set CHATFORGE_API_KEY)")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together per model (default 32)")
    p.add_argument("--max-pending", "--max-concurrent", dest="max_pending", type=int, default=64,
                   help="running + waiting requests per model; more get 429 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000, help="largest request body (default 1 MB)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "int8"], default="fp32",
                   help="weights and KV cache in fp32 (default, exact), bf16 (half the memory traffic), or int8 "
                   "weights with bf16 activations and cache (a quarter)")
    p.set_defaults(func=cmd_serve)
