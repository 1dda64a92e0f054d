"""Byte-level BPE (Sennrich et al., 2016; GPT-2's byte-level variant) trained with Hugging Face `tokenizers`.

Byte-level means every string, Chinese or English or emoji, is first turned into UTF-8 bytes, so no
text is ever unknown and decode(encode(s)) == s exactly. Saved as `tokenizer.json` plus a
`tokenizer_config.json` holding the ChatML chat template, so `transformers` loads the same tokenizer.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from chatforge.errors import ChatforgeError

EOT, IM_START, IM_END, PAD = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"
SPECIAL_TOKENS = [EOT, IM_START, IM_END, PAD]

# ChatML (OpenAI): <|im_start|>role\ncontent<|im_end|>\n for each message; the same Jinja
# template goes into tokenizer_config.json so transformers' apply_chat_template agrees with us.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Learn BPE merges on `texts` until the vocabulary has `vocab_size` entries (256 bytes + specials + merges)."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum + 1:
        raise ChatforgeError(
            f"--vocab-size {vocab_size} is too small: 256 byte tokens and {len(SPECIAL_TOKENS)} special "
            f"tokens need {minimum}, plus room for merges; use at least {minimum + 1} (e.g. 8192)"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": None,
        "additional_special_tokens": [EOT, IM_START],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1_000_000,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer(src: str | Path, dst: str | Path) -> None:
    """Give a run folder the tokenizer files of the run (or data folder) it came from."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(src) / name).is_file():
            shutil.copy(Path(src) / name, Path(dst) / name)


def load_tokenizer(folder: str | Path) -> Tokenizer:
    """Load `tokenizer.json` from a tokenizer folder or any run folder that holds one."""
    path = Path(folder)
    path = path if path.name == "tokenizer.json" else path / "tokenizer.json"
    if not path.is_file():
        raise ChatforgeError(f"{path}: no tokenizer here; train one with `chatforge tokenizer --out {path.parent}`")
    tok = Tokenizer.from_file(str(path))
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ChatforgeError(f"{path}: tokenizer lacks the special tokens {missing}; retrain it with chatforge")
    return tok


def encode(tok: Tokenizer, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def decode(tok: Tokenizer, ids: list[int]) -> str:
    return tok.decode(ids, skip_special_tokens=False)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The ChatML text of a conversation, the same string CHAT_TEMPLATE renders."""
    text = "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)
    return text + (f"{IM_START}assistant\n" if add_generation_prompt else "")
