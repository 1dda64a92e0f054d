"""The web chat page in a real browser (the system's Chromium, driven by Playwright) against the live test
server: the API-key form, a streamed multi-turn chat (Chinese included), the arena, phone width, and a
clean console. The models are tiny and talk nonsense; the tests check how text arrives, not what it says."""

import json
import shutil

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT = 30_000  # ms: the CPU is slow
KEY = "test-key"  # the live_server fixture's
expect.set_options(timeout=WAIT)

# Records the assistant bubble's text length at every change: the page sets the whole reply so far as
# the bubble's text each time a piece arrives, so each added text node is a snapshot of that moment.
WATCH_LENGTHS = """() => {
  window.lengths = [];
  new MutationObserver((records) => {
    for (const r of records) for (const node of r.addedNodes) {
      if (node.nodeType === Node.TEXT_NODE && r.target.dataset.testid === "msg-assistant"
          && r.target.dataset.done !== "true") window.lengths.push(node.data.length);
    }
  }).observe(document.querySelector("[data-testid=messages]"), {childList: true, subtree: true});
}"""


# Replaces the page's fetch() for /chat/completions with a stream of the given server-sent events that
# arrives one byte at a time, so every line and every character is split across reads; it ends with the
# events if they end in [DONE], else it waits, as a slow model would, until the request is aborted.
FAKE_STREAM = """(events) => {
  const realFetch = window.fetch;
  window.sentBodies = [];
  window.fetch = async (url, options) => {
    if (!String(url).endsWith("/chat/completions")) return realFetch(url, options);
    window.sentBodies.push(JSON.parse(options.body));
    const body = new ReadableStream({
      start(controller) {
        for (const byte of new TextEncoder().encode(events)) controller.enqueue(new Uint8Array([byte]));
        if (events.endsWith("data: [DONE]\\n\\n")) return controller.close();
        options.signal.addEventListener("abort", () => controller.error(new DOMException("stopped", "AbortError")));
      },
    });
    return new Response(body, {headers: {"Content-Type": "text/event-stream"}});
  };
}"""


def events(*pieces: str, done: bool = True) -> str:
    """A chat completion's server-sent events, one chunk per piece, as the server words them."""
    chunks = [{"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": p}}]} for p in pieces]
    lines = [f"data: {json.dumps(c, ensure_ascii=False)}\n\n" for c in chunks]
    return "".join(lines) + ("data: [DONE]\n\n" if done else "")


def by(testid: str) -> str:
    return f"[data-testid={testid}]"


@pytest.fixture(scope="module")
def browser():
    if not shutil.which(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, live_server):
    """open_page(key=..., **context options) -> (page, errors): the chat page in a fresh browser profile,
    with the API key already saved (unless key=None) and the console's errors collected."""
    contexts = []

    def open_(key: str | None = KEY, **options):
        context = browser.new_context(**options)
        contexts.append(context)
        if key:
            context.add_init_script(f"localStorage.setItem('chatforge-api-key', {json.dumps(key)})")
        page = context.new_page()
        page.set_default_timeout(WAIT)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
        page.goto(live_server + "/")
        return page, errors

    yield open_
    for context in contexts:
        context.close()


def settings(page, max_tokens: int, temperature: float = 0.0) -> None:
    """Greedy by default, so a reply is the same on every run (a sampled one could end at its first token)."""
    page.fill(by("max-tokens"), str(max_tokens))
    page.fill(by("temperature"), str(temperature))


def sse_text(body: bytes) -> str:
    """The reply a streamed chat completion carried, joined from its `data:` chunks."""
    text = ""
    for line in body.decode("utf-8").splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[len("data: "):])["choices"]:
                text += choice["delta"].get("content", "")
    return text


def test_asks_for_the_api_key_then_loads_the_models(open_page):
    page, errors = open_page(key=None)
    expect(page.locator(by("api-key-input"))).to_be_visible()  # /v1/models said 401
    expect(page.locator(by("error"))).to_contain_text("API key")
    assert page.locator(f"{by('model-select')} option").count() == 0
    page.fill(by("api-key-input"), KEY)
    page.click(by("api-key-save"))
    expect(page.locator(f"{by('model-select')} option")).to_have_text(["base", "sft"])
    expect(page.locator(by("api-key-input"))).to_be_hidden()
    expect(page.locator(by("error"))).to_be_hidden()
    assert page.evaluate("localStorage.getItem('chatforge-api-key')") == KEY
    # the 401 itself is the only console error (Chromium logs every failed request)
    assert errors and all("401" in e for e in errors), errors


def test_chat_streams_replies_and_sends_the_whole_conversation(open_page):
    page, errors = open_page()
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else 0)
    expect(page.locator(f"{by('model-select')} option")).to_have_count(2)
    assert page.input_value(by("model-select")) == "sft"  # a chat model is picked first, not the base model
    page.select_option(by("model-select"), "base")  # the base model's long replies show streaming best
    settings(page, max_tokens=10)  # the test models' context is 64 tokens, and the second turn must fit
    page.evaluate(WATCH_LENGTHS)

    # Chinese: 3 bytes a character, so pieces of the stream often end inside one
    question = "写一句关于春天的诗。"
    page.fill(by("message-input"), question)
    with page.expect_response(lambda r: r.url.endswith("/chat/completions")) as answer:
        page.click(by("send-button"))
    expect(page.locator(by("msg-user"))).to_have_text([question])
    first = page.locator(by("msg-assistant")).nth(0)
    expect(first).to_have_attribute("data-done", "true")
    reply = first.text_content()
    assert reply.strip()
    lengths = page.evaluate("window.lengths")
    assert len({n for n in lengths if n}) > 1, f"the reply did not stream in: lengths seen {lengths}"
    assert max(lengths) == len(reply)
    # decoded exactly as the server sent it (no "\ufffd" of the page's own: a tiny model can itself emit bytes
    # that are not UTF-8, which the server sends as "\ufffd"; test_split_characters_decode_exactly covers the rest)
    assert reply == sse_text(answer.value.body())

    # the second turn, sent with Enter (Shift+Enter only adds a line)
    page.fill(by("message-input"), "And")
    page.press(by("message-input"), "Shift+Enter")
    page.type(by("message-input"), "more?")
    assert page.locator(by("msg-user")).count() == 1
    page.press(by("message-input"), "Enter")
    expect(page.locator(f"{by('messages')} > *")).to_have_count(4)
    expect(page.locator(by("msg-assistant")).nth(1)).to_have_attribute("data-done", "true")
    assert page.locator(by("msg-assistant")).nth(1).text_content().strip()
    expect(page.locator(by("error"))).to_be_hidden()

    assert len(sent) == 2
    assert sent[1]["messages"] == [{"role": "user", "content": question}, {"role": "assistant", "content": reply},
                                   {"role": "user", "content": "And\nmore?"}]
    assert sent[1]["model"] == "base" and sent[1]["stream"] is True
    assert (sent[1]["max_tokens"], sent[1]["temperature"], sent[1]["top_p"]) == (10, 0.0, 0.95)
    assert errors == []

    page.click(by("new-chat"))
    expect(page.locator(f"{by('messages')} > *")).to_have_count(0)


def test_split_characters_decode_exactly(open_page):
    page, errors = open_page()
    expect(page.locator(f"{by('model-select')} option")).to_have_count(2)
    poem = ["春眠不觉晓，", "处处闻啼鸟。", "\n夜来风雨声，", "花落知多少。"]
    page.evaluate(FAKE_STREAM, events(*poem))
    page.fill(by("message-input"), "写一首诗。")
    page.press(by("message-input"), "Enter")
    bubble = page.locator(by("msg-assistant"))
    expect(bubble).to_have_attribute("data-done", "true")
    assert bubble.text_content() == "".join(poem)
    assert "\ufffd" not in bubble.text_content()
    assert errors == []


def test_stop_ends_the_reply_and_keeps_its_text(open_page):
    page, errors = open_page()
    expect(page.locator(f"{by('model-select')} option")).to_have_count(2)
    page.evaluate(FAKE_STREAM, events("Once upon", " a time", done=False))  # then nothing more comes
    page.fill(by("message-input"), "Tell a story.")
    page.click(by("send-button"))
    bubble = page.locator(by("msg-assistant"))
    expect(bubble).to_have_text("Once upon a time")
    expect(page.locator(by("send-button"))).to_be_disabled()
    assert bubble.get_attribute("data-done") is None
    page.click(by("stop-button"))
    expect(bubble).to_have_attribute("data-done", "true")
    expect(bubble).to_have_text("Once upon a time")
    expect(page.locator(by("send-button"))).to_be_enabled()
    expect(page.locator(by("stop-button"))).to_be_disabled()
    expect(page.locator(by("error"))).to_be_hidden()  # stopping is not an error

    # "New chat" in the middle of a reply: it stops, and nothing of the old conversation is sent again
    page.fill(by("message-input"), "Another.")
    page.click(by("send-button"))
    expect(page.locator(by("msg-assistant")).nth(1)).to_have_text("Once upon a time")
    page.click(by("new-chat"))
    expect(page.locator(f"{by('messages')} > *")).to_have_count(0)
    expect(page.locator(by("send-button"))).to_be_enabled()
    page.evaluate(FAKE_STREAM, events("Hello."))
    page.fill(by("message-input"), "Hi.")
    page.click(by("send-button"))
    expect(bubble).to_have_attribute("data-done", "true")
    assert page.evaluate("window.sentBodies")[0]["messages"] == [{"role": "user", "content": "Hi."}]
    assert errors == []


def test_api_errors_are_shown(open_page):
    page, errors = open_page()
    expect(page.locator(f"{by('model-select')} option")).to_have_count(2)
    long = " ".join(["the sea"] * 100)  # far past the test models' 64-token context
    page.fill(by("message-input"), long)
    page.click(by("send-button"))
    expect(page.locator(by("error"))).to_contain_text("maximum context length")
    expect(page.locator(f"{by('messages')} > *")).to_have_count(0)  # the failed turn is taken back
    assert page.input_value(by("message-input")) == long  # and its text returned to the box
    assert all("400" in e for e in errors), errors


def test_arena_streams_every_model_side_by_side(open_page):
    page, errors = open_page()
    sent = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else 0)
    expect(page.locator(f"{by('model-select')} option")).to_have_count(2)
    settings(page, max_tokens=12)
    page.fill(by("system-prompt"), "Be brief.")
    page.click(by("tab-arena"))
    expect(page.locator(by("model-select"))).to_be_hidden()  # the arena uses every checked model instead
    expect(page.locator(by("arena-model"))).to_have_count(2)
    page.fill(by("arena-input"), "Sing of the moon.")
    page.click(by("arena-send"))
    columns = page.locator(by("arena-column"))
    expect(columns).to_have_count(2)
    for i, name in enumerate(["base", "sft"]):
        column = columns.nth(i)
        expect(column).to_have_attribute("data-model", name)
        expect(column.locator("h2")).to_have_text(name)
        expect(column).to_have_attribute("data-done", "true")
        assert column.locator(by("arena-reply")).text_content().strip()
    assert sorted(body["model"] for body in sent) == ["base", "sft"]
    for body in sent:
        assert body["messages"] == [{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "Sing of the moon."}]
    assert errors == []


def test_phone_width(open_page):
    page, errors = open_page(viewport={"width": 375, "height": 740})
    expect(page.locator(f"{by('model-select')} option")).to_have_count(2)
    assert page.evaluate("document.documentElement.scrollWidth") <= 375 + 1
    settings(page, max_tokens=12)
    page.click(by("tab-arena"))
    page.fill(by("arena-input"), "Sing of the moon.")
    page.click(by("arena-send"))
    columns = page.locator(by("arena-column"))
    expect(columns).to_have_count(2)
    for i in range(2):
        expect(columns.nth(i)).to_have_attribute("data-done", "true")
    first, second = columns.nth(0).bounding_box(), columns.nth(1).bounding_box()
    assert second["y"] >= first["y"] + first["height"], (first, second)  # stacked, not side by side
    assert page.evaluate("document.documentElement.scrollWidth") <= 375 + 1
    page.click(by("tab-chat"))
    assert page.evaluate("document.documentElement.scrollWidth") <= 375 + 1
    assert errors == []
