import json

import pytest

from chatforge.data.chat import build_examples, collate, load_conversations, tokenize_conversation
from chatforge.errors import ChatforgeError
from chatforge.tokenizer import IM_END, decode, load_tokenizer, render_chat

CONVERSATION = [
    {"role": "system", "content": "You write verse."},
    {"role": "user", "content": "Write a line that contains the word \"crown\"."},
    {"role": "assistant", "content": "Uneasy lies the head that wears a crown."},
    {"role": "user", "content": "写一句含有「月」的五言诗句。"},
    {"role": "assistant", "content": "举头望明月"},
]


def test_loss_mask_covers_exactly_the_assistant_turns(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    ids, mask = tokenize_conversation(tok, CONVERSATION)
    assert decode(tok, ids) == render_chat(CONVERSATION)
    # the trained-on tokens, run by run, are each assistant turn's content plus its <|im_end|>
    runs, current = [], []
    for token, m in zip(ids, mask, strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(decode(tok, current))
            current = []
    assert runs == [m["content"] + IM_END for m in CONVERSATION if m["role"] == "assistant"]


def test_collate_shifts_targets_and_masks_padding(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    short = tokenize_conversation(tok, CONVERSATION[1:3])
    long = tokenize_conversation(tok, CONVERSATION)
    x, y = collate([short, long], pad_id=3)
    assert x.shape == y.shape == (2, len(long[0]) - 1)
    n = len(short[0]) - 1
    assert (x[0, n:] == 3).all() and (y[0, n:] == -100).all()
    for row, (ids, mask) in enumerate([short, long]):
        for t in range(len(ids) - 1):
            assert y[row, t] == (ids[t + 1] if mask[t + 1] else -100)


def test_ids_equal_transformers_apply_chat_template(tokenizer_dir):
    from transformers import AutoTokenizer  # a test dependency only, installed by `make test`

    hf = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ours, _ = tokenize_conversation(load_tokenizer(tokenizer_dir), CONVERSATION)
    text = hf.apply_chat_template(CONVERSATION, tokenize=False)
    assert text == render_chat(CONVERSATION)
    assert hf(text, add_special_tokens=False)["input_ids"] == ours
    prompt = hf.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt == render_chat(CONVERSATION[:2], add_generation_prompt=True)


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("bad_row, message", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
    ({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}, "role 'wizard'"),
    ("{not json", "not valid JSON"),
    ({"question": "q", "answer": "a"}, "needs \"messages\""),
])
def test_bad_rows_name_file_and_line_before_training(tmp_path, bad_row, message):
    good = {"prompt": "p", "completion": "c"}
    path = write_rows(tmp_path / "sft.jsonl", [good, good, bad_row])
    with pytest.raises(ChatforgeError, match=f"sft.jsonl:3: .*{message}"):
        load_conversations(path)


def test_over_long_conversations_are_skipped_and_counted(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    convs = [CONVERSATION[1:3], [{"role": "user", "content": "long " * 200}, {"role": "assistant", "content": "x"}]]
    examples, skipped = build_examples(tok, convs, context=64)
    assert len(examples) == 1 and skipped == 1
