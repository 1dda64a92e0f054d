"""`chatforge serve`: load the named runs, start one engine per model, and serve the API and the page."""

from __future__ import annotations

from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.layout import MODEL_FOLDERS

PIPELINE_ORDER = list(MODEL_FOLDERS.values())  # how the arena lays out a demo folder's models


def is_model_run(folder: Path) -> bool:
    return (folder / "model.json").is_file() or (folder / "adapter.json").is_file()


def run_folders(specs: list[str]) -> dict[str, Path]:
    """NAME=DIR or DIR (named after its folder). A folder of runs, such as runs/demo, gives every
    language model in it, so `--run runs/demo` puts base, SFT and the aligned models side by side."""
    runs: dict[str, Path] = {}
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        folder = Path(path)
        if not folder.is_dir():
            raise ChatforgeError(f"--run {spec}: {folder} is not a folder")
        if is_model_run(folder):
            found = {name or folder.name: folder}
        else:
            subs = [f for f in sorted(folder.iterdir()) if f.is_dir() and is_model_run(f)]
            subs.sort(key=lambda f: PIPELINE_ORDER.index(f.name) if f.name in PIPELINE_ORDER else len(PIPELINE_ORDER))
            if not subs or name:
                raise ChatforgeError(f"--run {spec}: {folder} holds no language model (model.json or adapter.json); "
                                     "a reward model or classifier cannot chat")
            found = {f.name: f for f in subs}
        for key, value in found.items():
            if key in runs:
                raise ChatforgeError(f"--run {spec}: the name '{key}' is taken; name it with NAME=DIR")
            runs[key] = value
    if not runs:
        raise ChatforgeError("give at least one --run DIR")
    return runs


def load_engines(specs: list[str], max_batch: int, max_pending: int, dtype: str = "fp32") -> dict:
    """One engine per model. bf16 halves the bytes every decode step reads (weights and KV cache); int8
    weights (model/quantize.py) halve them again."""
    from chatforge.model.io import load_run_model
    from chatforge.model.quantize import for_inference
    from chatforge.serve.engine import Engine
    from chatforge.tokenizer import load_tokenizer

    return {name: Engine(for_inference(load_run_model(folder), dtype), load_tokenizer(folder), max_batch,
                         max_pending) for name, folder in run_folders(specs).items()}


def check_port(host: str, port: int) -> None:
    """Fail before loading any model when the address cannot be had."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise ChatforgeError(f"cannot listen on {host}:{port} ({e.strerror}); "
                             "choose another --port or --host") from None


def serve(specs: list[str], host: str, port: int, api_key: str | None, max_batch: int, max_pending: int,
          max_body_bytes: int, dtype: str = "fp32") -> None:
    import uvicorn

    from chatforge.serve.api import Limits, create_app

    check_port(host, port)
    engines = load_engines(specs, max_batch, max_pending, dtype)
    app = create_app(engines, api_key, Limits(max_body_bytes=max_body_bytes))
    where = f"http://{host}:{port}"
    print(f"chatforge serve: models {', '.join(engines)}; chat page {where}/ ; API {where}/v1"
          + (" (API key required)" if api_key else ""), flush=True)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        print(f"chatforge serve: warning: listening on {host} with no --api-key: anyone who reaches it can use it",
              flush=True)
    try:
        uvicorn.run(app, host=host, port=port, log_level="warning")
    finally:
        for engine in engines.values():
            engine.close()
