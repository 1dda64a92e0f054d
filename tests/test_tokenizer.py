import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatforge.errors import ChatforgeError
from chatforge.tokenizer import (
    CHAT_TEMPLATE,
    SPECIAL_TOKENS,
    decode,
    encode,
    load_tokenizer,
    render_chat,
    train_tokenizer,
)


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(tokenizer_dir, text):
    tok = load_tokenizer(tokenizer_dir)
    assert decode(tok, encode(tok, text)) == text


@pytest.mark.smoke
def test_chinese_and_english_compress(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    for text in ["床前明月光，疑是地上霜。", "And God said, Let there be light: and there was light."]:
        ids = encode(tok, text)
        assert decode(tok, ids) == text
        assert len(ids) < len(text.encode("utf-8"))  # merges learned on the corpus shorten the text


def test_special_tokens_are_single_ids(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    for special in SPECIAL_TOKENS:
        assert encode(tok, special) == [tok.token_to_id(special)]
    assert tok.get_vocab_size() == 1024


def test_chat_template_saved_and_matches_render(tokenizer_dir):
    import jinja2

    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "写一句诗"},
                {"role": "assistant", "content": "床前明月光"}]
    template = jinja2.Environment().from_string(CHAT_TEMPLATE)
    for gen in (False, True):
        assert template.render(messages=messages, add_generation_prompt=gen) == render_chat(messages, gen)


def test_chinese_characters_become_whole_tokens_in_a_mostly_english_corpus():
    import gzip

    from chatforge.tokenizer import cjk_coverage, cjk_repeats
    from conftest import DEMO_CORPUS

    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as f:
        english = [json.loads(line)["text"] for line, _ in zip(f, range(60), strict=False)]
    english = [text for text in english if json.dumps(text).isascii()]
    poems = ["床前明月光，疑是地上霜。举头望明月，低头思故乡。", "白日依山尽，黄河入海流。欲穷千里目，更上一层楼。"]
    corpus = english + poems  # a few hundred KB of English, 40 Chinese characters
    assert cjk_repeats(lambda: corpus, 0.0) == 1 and cjk_repeats(lambda: english, 0.25) == 1
    repeats, other = cjk_repeats(lambda: corpus, 0.25), sum(map(len, corpus)) - 40
    assert 40 * repeats / (40 * repeats + other) >= 0.25 > 40 * (repeats - 1) / (40 * (repeats - 1) + other)
    for share, whole in ((0.0, False), (0.25, True)):
        tok = train_tokenizer(lambda: corpus, 1024, cjk_share=share)
        chars = set("".join(poems)) - set("，。")
        assert all(len(encode(tok, c)) == 1 for c in chars) == whole
        assert (cjk_coverage(tok, lambda: poems) == (len(chars), len(chars))) == whole
        for line in poems:
            pieces = [tok.decode([i]) for i in encode(tok, line)]
            assert decode(tok, encode(tok, line)) == line
            if whole:  # one token per character: no token joins two characters' bytes
                assert pieces == list(line)
    text = "".join(english)
    assert len(encode(tok, text)) < len(text) / 2  # English still compresses


def test_transformers_reads_the_chinese_aware_tokenizer_the_same(tmp_path):
    from transformers import PreTrainedTokenizerFast

    from chatforge.tokenizer import save_tokenizer

    corpus = ["And God said, Let there be light: and there was light. " * 50, "床前明月光，疑是地上霜。" * 5]
    save_tokenizer(train_tokenizer(lambda: corpus, 400), tmp_path)
    tok, hf = load_tokenizer(tmp_path), PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "写一句以「月」开头的五言诗句。"},
                {"role": "assistant", "content": "月落乌啼霜满天"}]
    for text in ["床前明月光 light 🌙", render_chat(messages)]:
        assert hf.encode(text, add_special_tokens=False) == encode(tok, text)
        assert hf.decode(encode(tok, text)) == text
    assert hf.apply_chat_template(messages, tokenize=False) == render_chat(messages)


def test_vocab_too_small_is_refused():
    with pytest.raises(ChatforgeError, match="too small"):
        train_tokenizer(lambda: ["hello world"], 200)
    for share in (-0.1, 1.0):
        with pytest.raises(ChatforgeError, match="cjk-share"):
            train_tokenizer(lambda: ["hello world"], 300, cjk_share=share)


def test_missing_tokenizer_names_the_path(tmp_path):
    with pytest.raises(ChatforgeError, match="tokenizer.json"):
        load_tokenizer(tmp_path)


def byte_token_ids(tok, text: str) -> list[int]:
    """One token per UTF-8 byte, through GPT-2's byte-to-character table: the worst case for streaming."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return [tok.token_to_id(table[b]) for b in text.encode("utf-8")]


@pytest.mark.smoke
def test_streaming_never_emits_half_a_chinese_character(tokenizer_dir, monkeypatch):
    import chatforge.model.generate as gen

    tok = load_tokenizer(tokenizer_dir)
    reply = "举头望明月，低头思故乡。 moon 🌙"
    ids = byte_token_ids(tok, reply)
    assert decode(tok, ids) == reply and len(ids) == len(reply.encode("utf-8"))
    monkeypatch.setattr(gen, "generate_ids", lambda *args, **kwargs: iter(ids))
    pieces = list(gen.stream_text(None, tok, "prompt", gen.Sampling()))
    assert "".join(pieces) == reply and all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 10  # streamed as it came, not all at the end
    cut = list(gen.stream_text(None, tok, "prompt", gen.Sampling(stop=["思故"])))
    assert "".join(cut) == "举头望明月，低头"


def test_a_reply_cut_inside_a_character_ends_without_the_half_character(tokenizer_dir, monkeypatch):
    import chatforge.model.generate as gen

    tok = load_tokenizer(tokenizer_dir)
    ids = byte_token_ids(tok, "明月光")[:-1]  # max_new_tokens ends the reply one byte short of 光
    monkeypatch.setattr(gen, "generate_ids", lambda *args, **kwargs: iter(ids))
    assert decode(tok, ids).endswith("\ufffd")
    assert "".join(gen.stream_text(None, tok, "prompt", gen.Sampling())) == "明月"


def test_tokenizer_command_says_how_many_chinese_characters_are_whole(tmp_path, capsys):
    from chatforge.cli import main

    corpus = tmp_path / "corpus.txt"
    english = "And God said, Let there be light: and there was light.\n\n" * 200
    corpus.write_text(english + "床前明月光，疑是地上霜。\n\n")
    main(["tokenizer", "--data", str(corpus), "--vocab-size", "400", "--out", str(tmp_path / "tok")])
    assert "10 of the corpus's 10 distinct CJK characters are one token" in capsys.readouterr().out
    main(["tokenizer", "--data", str(corpus), "--vocab-size", "400", "--cjk-share", "0", "--out", str(tmp_path / "t0")])
    whole = re.search(r"(\d+) of the corpus's 10 distinct CJK characters are one token", capsys.readouterr().out)
    assert whole and int(whole.group(1)) < 10  # plain byte-level BPE: most stay 3 byte tokens
