"""500 malformed or hostile requests against the API: every answer is a 4xx or a 2xx, never a 5xx, and the
server answers a good request afterwards."""

from __future__ import annotations

import json

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatforge.model.transformer import ModelConfig, Transformer
from chatforge.serve.api import Limits, create_app
from chatforge.serve.engine import Engine
from chatforge.tokenizer import load_tokenizer

KEY = "fuzz-key"
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/", "/static/app.js",
         "/static/..%2Fapi.py", "/v1/chat/completions/", "/v1", "/v1/embeddings"]
FIELDS = ["model", "messages", "prompt", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop",
          "stream", "seed", "n", "stream_options", "role", "content"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.sampled_from(["m", "", "system", "user", "assistant", "tool", "\ud800", "写诗", "<|im_end|>"]))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.sampled_from(FIELDS) | st.text(max_size=8), inner, max_size=5), max_leaves=12)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "bot", 3]),
                                           "content": values}), max_size=3)
near_valid = st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "other", 7, None])},
    optional={"messages": messages | values, "prompt": values, "temperature": values, "top_p": values,
              "max_tokens": st.integers(-5, 10**6) | values, "stop": values, "stream": values, "seed": values,
              "n": values, "stream_options": values})



def one_field_off(key: str, value) -> dict:
    """A good request (chat or completion) with one field replaced by a hostile value."""
    if key == "prompt":
        return {"model": "m", "prompt": value, "max_tokens": 3}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    if key in ("role", "content"):
        body["messages"][0][key] = value
    else:
        body[key] = value
    return body


hostile_values = values | st.sampled_from(["\ud800", "\udfff写", "x" * 3000, "<|im_end|><|endoftext|>", -1, 2**64])
off_by_one = st.builds(one_field_off, st.sampled_from(FIELDS[:12] + ["role", "content"]), hostile_values)


def encode_body(body) -> bytes:
    if isinstance(body, bytes):
        return body
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


anything = st.tuples(
    st.sampled_from(["POST"] * 8 + ["GET", "PUT", "DELETE"]),
    st.sampled_from(PATHS),
    st.one_of(off_by_one, near_valid, values, st.binary(max_size=200),
              st.sampled_from([b"[" * 5000, b"x" * 5000, b"[" * 3000, b'{"model": "m", "messages": [' * 200])),
    st.sampled_from([f"Bearer {KEY}"] * 4 + ["Bearer wrong", "", "Basic abc"]),
    st.sampled_from(["application/json", "text/plain", "", "application/json; charset=latin-1"]),
)
# half the requests get past the door (right route, method and key) so the body itself is what is tested
past_the_door = st.tuples(st.just("POST"), st.sampled_from(PATHS[:2]), off_by_one | near_valid,
                          st.just(f"Bearer {KEY}"), st.just("application/json"))
request_strategy = anything | past_the_door


@pytest.fixture(scope="module")
def fuzz_app(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.get_vocab_size(), context=32, n_layer=1, n_head=2, d_model=32))
    engine = Engine(model.eval(), tok, max_batch=4, max_pending=8)
    with TestClient(create_app({"m": engine}, api_key=KEY, limits=Limits(max_body_bytes=4096)),
                    raise_server_exceptions=False) as http:
        yield http
    engine.close()


def test_fuzz_500_hostile_requests_never_5xx(fuzz_app):
    statuses: list[int] = []

    @settings(max_examples=500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(request_strategy)
    def one(req):
        method, path, body, auth, ctype = req
        headers = {"content-type": ctype} if ctype else {}
        if auth:
            headers["authorization"] = auth
        r = fuzz_app.request(method, path, content=encode_body(body), headers=headers)
        statuses.append(r.status_code)
        assert r.status_code < 500, (method, path, body, r.status_code, r.text[:300])
        if path.startswith("/v1/") and r.status_code >= 400:
            assert set(r.json()["error"]) >= {"message", "type"}  # OpenAI's error body

    one()
    assert len(statuses) == 500 and len(set(statuses)) >= 4  # the requests really did reach different answers
    good = fuzz_app.post("/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"},
                         json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                               "temperature": 0})
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] >= 1
