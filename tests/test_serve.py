"""Serving: the continuous-batching engine against the one-request generator, and the OpenAI-compatible API
driven by the stock `openai` client and by raw HTTP against a live server."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch
from fastapi.testclient import TestClient

from chatforge.model.generate import Sampling, default_stop_ids, generate_ids
from chatforge.model.moe import MoEConfig
from chatforge.model.transformer import ModelConfig, Transformer
from chatforge.serve.api import Limits, create_app
from chatforge.serve.engine import Engine, EngineBusy, Request
from chatforge.tokenizer import encode, load_tokenizer

NEVER = 10**9  # max_new_tokens that never binds: replies end by the context or a stop


def tiny_model(style: str, vocab: int, context: int = 64) -> Transformer:
    """style: gpt2, llama, or llama-moe (4 experts, top-2: model/moe.py)."""
    torch.manual_seed(0)
    style, _, moe = style.partition("-")
    cfg = ModelConfig(style=style, vocab_size=vocab, context=context, n_layer=2, n_head=4, d_model=64,
                      n_kv_head=2 if style == "llama" else 0, moe=MoEConfig(n_experts=4 if moe else 0))
    return Transformer(cfg).eval()


def collect(events: list) -> callable:
    return lambda piece, finish: events.append((piece, finish))


def test_a_seeded_request_samples_the_same_reply_from_serve_as_from_chat(tokenizer_dir):
    """One sampler for `chat`/`generate` and `serve`: a seeded request, batched with others, gets token for
    token the reply that generate_ids samples for it alone, with top-p, top-k or neither."""
    tok = load_tokenizer(tokenizer_dir)
    model = tiny_model("llama", tok.get_vocab_size())
    engine = Engine(model, tok, max_batch=4, start=False)
    settings = [Sampling(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7),
                Sampling(temperature=0.8, top_k=20, max_new_tokens=16, seed=8),
                Sampling(temperature=1.2, max_new_tokens=16, seed=9),
                Sampling(temperature=1.0, max_new_tokens=16)]  # unseeded: draws from the global stream
    texts = ["And God said", "The king", "写一句关于春天的诗", "O Romeo, Romeo"]
    requests = [Request(encode(tok, t), s, collect([])) for t, s in zip(texts, settings, strict=True)]
    with torch.no_grad():
        engine.step(requests)
        for _ in range(20):
            engine.step([])
    for r in requests[:3]:
        alone = list(generate_ids(model, r.prompt_ids, r.sampling, default_stop_ids(tok)))
        assert r.tokens == alone and len(alone) >= 4


@pytest.mark.parametrize("style", ["gpt2", "llama", "llama-moe"])
def test_engine_matches_one_at_a_time_generation_while_requests_join_and_leave(style, tokenizer_dir):
    """Requests join a running batch at different steps and leave at different lengths; each gets exactly
    the greedy tokens it would get alone, so batching changes speed, never replies."""
    tok = load_tokenizer(tokenizer_dir)
    model = tiny_model(style, tok.get_vocab_size())
    engine = Engine(model, tok, max_batch=3, start=False)
    texts = ["And God said", "The king", "写一句关于春天的诗", "O Romeo, Romeo", "Let there be light"]
    lengths = [20, 5, 12, 30, 8]
    requests = [Request(encode(tok, t), Sampling(temperature=0, max_new_tokens=n), collect([]))
                for t, n in zip(texts, lengths, strict=True)]
    joins = {0: [0, 1], 2: [2], 3: [3, 4]}  # step -> requests that arrive then (4 waits: max_batch is 3)
    waiting, widths = [], []
    with torch.no_grad():
        for step in range(60):
            waiting += [requests[i] for i in joins.get(step, [])]
            room = engine.max_batch - len(engine.rows)
            joining, waiting = waiting[:room], waiting[room:]
            engine.step(joining)
            widths.append(len(engine.rows))
            if engine.real is not None:  # no column is wider than the longest row needs
                assert engine.real.shape[1] == int(engine.real.sum(1).max())
        for r in requests:
            alone = list(generate_ids(model, r.prompt_ids, r.sampling, default_stop_ids(tok)))
            assert r.tokens == alone
    assert max(widths) == 3 and widths[-1] == 0  # the batch filled up, and drained


def test_engine_sampling_is_per_request(tokenizer_dir):
    """A seeded request samples the same reply whatever shares its batch; top_p near 0 is greedy."""
    tok = load_tokenizer(tokenizer_dir)
    model = tiny_model("llama", tok.get_vocab_size())
    prompt = encode(tok, "The king")

    def run(companions: int) -> list[list[int]]:
        engine = Engine(model, tok, start=False)
        seeded = Request(prompt, Sampling(temperature=1.0, max_new_tokens=16, seed=7), collect([]))
        narrow = Request(prompt, Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=16), collect([]))
        others = [Request(encode(tok, "And"), Sampling(temperature=1.0, max_new_tokens=16), collect([]))
                  for _ in range(companions)]
        with torch.no_grad():
            engine.step([seeded, narrow, *others])
            while engine.rows:
                engine.step([])
        return [seeded.tokens, narrow.tokens]

    alone, crowded = run(0), run(5)
    assert alone[0] == crowded[0] and len(alone[0]) == 16
    greedy = list(generate_ids(model, prompt, Sampling(temperature=0, max_new_tokens=16), default_stop_ids(tok)))
    assert alone[1] == greedy == crowded[1]


def test_engine_cancel_busy_and_stop_strings(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    model = tiny_model("gpt2", tok.get_vocab_size())
    engine = Engine(model, tok, max_pending=2, start=False)
    prompt = encode(tok, "The king")
    events: list = []
    a = Request(prompt, Sampling(temperature=0, max_new_tokens=NEVER), collect(events))
    b = Request(prompt, Sampling(temperature=0, max_new_tokens=NEVER), collect([]))
    engine.submit(a)
    engine.submit(b)
    with pytest.raises(EngineBusy):
        engine.submit(Request(prompt, Sampling(), collect([])))
    with pytest.raises(ValueError):
        engine.submit(Request([], Sampling(), collect([])))
    with torch.no_grad():
        engine.step([engine.waiting.popleft(), engine.waiting.popleft()])
        engine.step([])
        a.cancel()
        engine.step([])
        assert [row.request for row in engine.rows] == [b]  # the cancelled row is gone before the next step
        seen = len(a.tokens)
        while engine.rows:
            engine.step([])
    assert len(a.tokens) == seen and b.completion_tokens == model.cfg.context - len(prompt)
    full = tok.decode(b.tokens)
    cut = full[len(full) // 2 : len(full) // 2 + 3]
    c = Request(prompt, Sampling(temperature=0, max_new_tokens=NEVER, stop=[cut]), collect(events := []))
    with torch.no_grad():
        engine.step([c])
        while engine.rows:
            engine.step([])
    text = "".join(p for p, _ in events)
    assert events[-1][1] == "stop" and text == full[: full.index(cut)]


def test_engine_thread_batches_concurrent_requests(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    engine = Engine(tiny_model("llama", tok.get_vocab_size()), tok, max_batch=8)
    done: list = []
    try:
        for _ in range(8):
            engine.submit(Request(encode(tok, "And God said"), Sampling(temperature=1.0, max_new_tokens=40),
                                  lambda p, f: f and done.append(f)))
        deadline = time.time() + 30
        while len(done) < 8 and time.time() < deadline:
            time.sleep(0.02)
    finally:
        engine.close()
    assert len(done) == 8 and engine.load == 0
    assert engine.row_steps / engine.steps > 3  # requests shared decode steps (mean batch size)


# ----- the API, through the stock openai client and raw HTTP, against a live server -----

def client(url: str, key: str = "test-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=60)


@pytest.mark.smoke
def test_openai_client_plain_streamed_multiturn(live_server):
    c = client(live_server)
    assert {m.id for m in c.models.list().data} == {"base", "sft"}
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "写一句关于春天的诗。"}]
    plain = c.chat.completions.create(model="sft", messages=messages, temperature=0, max_tokens=40)
    reply = plain.choices[0].message.content
    assert plain.choices[0].finish_reason in ("stop", "length") and plain.usage.completion_tokens >= 1
    assert "\ufffd" not in reply
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens
    chunks = list(c.chat.completions.create(model="sft", messages=messages, temperature=0, max_tokens=40, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == reply  # greedy: streaming changes delivery, not the reply
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == \
        plain.usage.completion_tokens
    pieces = c.chat.completions.create(model="base", messages=messages, temperature=0, max_tokens=20, stream=True)
    assert sum(1 for ch in pieces if ch.choices and ch.choices[0].delta.content) >= 5  # it came in pieces
    turns = [{"role": "user", "content": "Hi"}]
    first = c.chat.completions.create(model="sft", messages=turns, temperature=0, max_tokens=8)
    turns += [{"role": "assistant", "content": first.choices[0].message.content}, {"role": "user", "content": "More?"}]
    second = c.chat.completions.create(model="sft", messages=turns, temperature=0, max_tokens=8)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens  # history sent


def test_openai_client_limits_stop_and_errors(live_server):
    c = client(live_server)
    messages = [{"role": "user", "content": "Write a line about the sea."}]
    capped = c.chat.completions.create(model="base", messages=messages, temperature=0, max_tokens=5)
    assert capped.usage.completion_tokens == 5 and capped.choices[0].finish_reason == "length"
    full = c.chat.completions.create(model="base", messages=messages, temperature=0, max_tokens=30)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = c.chat.completions.create(model="base", messages=messages, temperature=0, max_tokens=30, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)] and cut.choices[0].finish_reason == "stop"
    legacy = c.completions.create(model="base", prompt="And God said", max_tokens=6, temperature=0)
    assert legacy.choices[0].finish_reason == "length" and legacy.usage.completion_tokens == 6
    with pytest.raises(openai.AuthenticationError):
        client(live_server, key="wrong").models.list()
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4", messages=messages)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="sft", messages=[{"role": "user", "content": "word " * 500}])
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="sft", messages=messages, temperature=5)
    assert httpx.get(f"{live_server}/health").json()["status"] == "ok"  # no key needed, and still serving


def test_sse_wire_format_and_disconnect_frees_the_row(live_server):
    headers = {"Authorization": "Bearer test-key"}
    body = {"model": "sft", "messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8}
    with httpx.stream("POST", f"{live_server}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])

    body.update(max_tokens=None, model="base", temperature=1.0)  # a long reply, dropped after its first piece
    with httpx.stream("POST", f"{live_server}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
        next(r.iter_lines())
    deadline = time.time() + 20
    while httpx.get(f"{live_server}/health").json()["models"]["base"]["running_or_waiting"] and time.time() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{live_server}/health").json()["models"]["base"]["running_or_waiting"] == 0


def test_busy_server_answers_429_and_body_limit_413(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    engine = Engine(tiny_model("gpt2", tok.get_vocab_size(), context=256), tok, max_pending=1)
    app = create_app({"m": engine}, limits=Limits(max_body_bytes=2000))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, "temperature": 0}
    try:
        with TestClient(app) as http:
            with http.stream("POST", "/v1/chat/completions", json=body) as first:
                next(first.iter_lines())  # the first request is running
                busy = http.post("/v1/chat/completions", json=body)
                assert busy.status_code == 429 and busy.json()["error"]["type"] == "rate_limit_error"
            big = http.post("/v1/chat/completions", content=b"x" * 3000, headers={"content-type": "application/json"})
            assert big.status_code == 413 and "2000 bytes" in big.json()["error"]["message"]
            chunked = http.post("/v1/completions", content=iter([b"{" + b" " * 1500, b" " * 1500 + b"}"]))
            assert chunked.status_code == 413  # no Content-Length: counted while reading
            deadline = time.time() + 20
            while engine.load and time.time() < deadline:
                time.sleep(0.05)
            ok = http.post("/v1/completions", json={"model": "m", "prompt": "The", "max_tokens": 3, "temperature": 0})
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    finally:
        engine.close()


def test_an_engine_failure_ends_its_requests_with_an_error_not_a_hang(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    engine = Engine(tiny_model("gpt2", tok.get_vocab_size()), tok)
    app = create_app({"m": engine})
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    forward = engine.model.forward
    try:
        with TestClient(app, raise_server_exceptions=False) as http:
            engine.model.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
            failed = http.post("/v1/chat/completions", json=body)
            assert failed.status_code == 500 and "boom" in failed.json()["error"]["message"]
            with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
                lines = [line for line in r.iter_lines() if line]
            assert "boom" in json.loads(lines[-2][6:])["error"]["message"] and lines[-1] == "data: [DONE]"
            engine.model.forward = forward
            assert http.post("/v1/chat/completions", json=body).status_code == 200  # and it serves again
    finally:
        engine.close()


def test_serve_command_errors_are_clear(tmp_path, capsys):
    import socket

    from chatforge.cli import main

    def error_of(*args: str) -> str:
        with pytest.raises(SystemExit) as e:
            main(["serve", *args])
        assert e.value.code == 2
        return capsys.readouterr().err

    assert "is not a folder" in error_of("--run", str(tmp_path / "missing"))
    (tmp_path / "rm").mkdir()
    (tmp_path / "rm" / "reward.json").write_text("{}")
    assert "cannot chat" in error_of("--run", str(tmp_path / "rm"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        assert f"cannot listen on 127.0.0.1:{port}" in error_of("--run", str(tmp_path / "rm"), "--port", port)


@pytest.mark.parametrize("dtype", ["bf16", "int8"])
def test_bf16_and_int8_engines_serve(pretrained, dtype):
    from chatforge.model.quantize import Int8Linear
    from chatforge.serve.server import load_engines

    engine = load_engines([f"base={pretrained[0]}"], max_batch=4, max_pending=8, dtype=dtype)["base"]
    done: list = []
    try:
        assert next(engine.model.parameters()).dtype == torch.bfloat16  # int8: weights int8, activations bf16
        assert any(isinstance(m, Int8Linear) for m in engine.model.modules()) == (dtype == "int8")
        request = Request(encode(engine.tok, "And God said"), Sampling(temperature=0, max_new_tokens=12),
                          lambda p, f: f and done.append(f))
        engine.submit(request)
        deadline = time.time() + 30
        while not done and time.time() < deadline:
            time.sleep(0.02)
    finally:
        engine.close()
    assert done in (["length"], ["stop"]) and 1 <= request.completion_tokens <= 12
    assert engine.cache is None and engine.steps >= 1  # it decoded, then the row left the batch
