"""Text generation with a KV cache: temperature, top-k, top-p (nucleus), stop tokens and strings, streaming.

The prompt is run once (prefill) to fill the cache; then each new token costs one position of compute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from chatforge.model.transformer import KVCache, StaticKVCache, Transformer
from chatforge.tokenizer import EOT, IM_END, decode, encode


@dataclass
class Sampling:
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # 0 = off; else keep the k most likely tokens
    top_p: float = 1.0  # 1 = off; else keep the smallest set of tokens with this much probability
    max_new_tokens: int = 200
    stop: list[str] = field(default_factory=list)  # stop strings, not included in the output
    seed: int | None = None


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  uniform: torch.Tensor, shortlist: int = 256) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab), each row with its own temperature (0 = greedy), top-k
    (0 = off), top-p (1 = off) and uniform number in [0, 1), all (B,): the one sampler of `chat`, `generate`,
    RL's rollouts and `serve`, so a seed gives the same reply everywhere.

    The tokens are ranked by probability only as far as needed: the `shortlist` most likely (topk), or the
    whole vocabulary for a row whose top-p nucleus is wider than that (a flat distribution). Top-k keeps the
    first k of them, top-p the smallest set holding p of the probability (Holtzman et al., 2020); a token is
    then drawn by inverting the cumulative distribution of what is kept at the row's `uniform`."""
    rows, vocab = logits.shape
    probs = (logits.float() / temperature.clamp(min=1e-4)[:, None]).softmax(dim=-1)
    nucleus, keep_k = top_p < 1, torch.where(top_k > 0, top_k, vocab)[:, None]
    untruncated = ~nucleus & (top_k <= 0)  # any order will do: no ranking at all
    if bool(untruncated.all()):
        ranked, order = probs, torch.arange(vocab, device=logits.device).expand(rows, vocab)
    else:
        ranked, order = probs.topk(min(max(shortlist, int(top_k.max())), vocab), dim=-1)
    wide = nucleus & (ranked.sum(-1) < top_p) & (keep_k.squeeze(-1) > ranked.shape[-1])  # past the shortlist
    if ranked.shape[-1] < vocab and bool((untruncated | wide).any()):
        ranked = F.pad(ranked, (0, vocab - ranked.shape[-1]))
        order = F.pad(order, (0, vocab - order.shape[-1]))
        ranked[untruncated], order[untruncated] = probs[untruncated], torch.arange(vocab, device=logits.device)
        ranked[wide], order[wide] = probs[wide].sort(dim=-1, descending=True)
    rank = torch.arange(ranked.shape[-1], device=logits.device)
    dropped = (nucleus[:, None] & (ranked.cumsum(dim=-1) - ranked >= top_p[:, None])) | (rank >= keep_k)
    cdf = ranked.masked_fill(dropped, 0.0).cumsum(dim=-1)
    pick = (cdf < uniform[:, None] * cdf[:, -1:]).sum(dim=-1, keepdim=True).clamp(max=cdf.shape[-1] - 1)
    return torch.where(temperature <= 0, logits.argmax(dim=-1), order.gather(-1, pick).squeeze(-1))


def sample_next(logits: torch.Tensor, s: Sampling, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, vocab), every row with the settings `s`, one uniform number
    each from `generator` (none is drawn for greedy decoding)."""
    if s.temperature <= 0:
        return logits.argmax(dim=-1)
    rows, device = logits.shape[0], logits.device
    full = lambda value, dtype: torch.full((rows,), value, dtype=dtype, device=device)  # noqa: E731
    uniform = torch.rand(rows, generator=generator, device=device)
    return sample_tokens(logits, full(s.temperature, torch.float32), full(s.top_k, torch.long),
                         full(s.top_p, torch.float32), uniform)


def compiled_decoder(model: Transformer) -> Callable:
    """`model` compiled for one-token steps over a StaticKVCache (same shapes every step: traced once).
    On a CPU most of an eager step of a small model is per-operation overhead, which the compiled graph
    removes. `freezing` folds the weights in as constants (and `max_autotune` times a few matrix-product
    kernels for each shape, then keeps the fastest), so this is for inference: a model trained after its
    first compiled step must be compiled again (`del model.compiled_decode`)."""
    if "compiled_decode" not in model.__dict__:  # a plain attribute: not a submodule, not in the state dict
        options = {"freezing": True, "cpp_wrapper": True}
        # With frozen weights and the C++ wrapper, max_autotune's matrix-product template computes wrong logits
        # from Inductor's AVX2 kernels (torch 2.13, a Zen 3 CPU: tests/test_model.py), so it is asked for only
        # where the CPU runs AVX-512 ones, and on GPUs.
        cpu = next(model.parameters()).device.type == "cpu"
        options["max_autotune"] = not cpu or torch.backends.cpu.get_cpu_capability() == "AVX512"
        model.__dict__["compiled_decode"] = torch.compile(model, fullgraph=True, dynamic=False, options=options)
    return model.__dict__["compiled_decode"]


@torch.no_grad()
def generate_ids(model: Transformer, prompt_ids: list[int], s: Sampling, stop_ids: set[int] | None = None,
                 use_cache: bool = True, compile: bool = False) -> Iterator[int]:
    """Yield new token ids one at a time, until a stop id, max_new_tokens, or the context is full.
    A prompt longer than the context keeps its last tokens, leaving room for the reply.
    compile=True: a preallocated cache and a compiled decode step (the first call compiles, seconds)."""
    context = model.cfg.context
    room = max(1, min(s.max_new_tokens, context // 2))
    ids = list(prompt_ids)[-(context - room):] if len(prompt_ids) > context - room else list(prompt_ids)
    if not ids:
        raise ValueError("generation needs at least one prompt token")
    device = next(model.parameters()).device
    generator = None
    if s.seed is not None:
        generator = torch.Generator(device=device).manual_seed(s.seed)
    cache = KVCache(model.cfg.n_layer) if use_cache else None
    step = model
    if compile and not use_cache:
        raise ValueError("compile=True needs the KV cache")
    if compile:
        cache = StaticKVCache(model.cfg, 1, device, next(model.parameters()).dtype)
    inputs = torch.tensor([ids], device=device)
    for _ in range(s.max_new_tokens):
        if len(ids) >= context:
            return
        logits = step(inputs if use_cache else torch.tensor([ids], device=device), cache=cache)[:, -1, :]
        if compile:  # the prompt ran eager (its length varies); every later step is one token: compiled
            step = compiled_decoder(model)
        token = int(sample_next(logits, s, generator))
        if stop_ids and token in stop_ids:
            return
        ids.append(token)
        yield token
        inputs = torch.full((1, 1), token, device=device)


def left_padded(prompts: list[list[int]], pad_token: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as one (rows, longest) batch, right-aligned so every row's next token is at the same column,
    and `real`, True at real tokens (for `Transformer.forward(real=...)`)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_token, dtype=torch.long, device=device)
    real = torch.zeros((len(prompts), width), dtype=torch.bool, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        real[i, width - len(p):] = True
    return ids, real


@torch.no_grad()
def generate_batch(model: Transformer, prompts: list[list[int]], s: Sampling, stop_ids: set[int], pad_token: int,
                   generator: torch.Generator | None = None) -> list[tuple[list[int], bool]]:
    """Sample replies to many prompts at once: the prompts are left-padded so every row's next token
    is at the same column, and `real` keeps pads out of attention and positions. Returns each reply's
    tokens (its stop token included, so RL can score and train on it) and whether it ended with one."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    budget = min(s.max_new_tokens, model.cfg.context - width)
    if budget < 1:
        raise ValueError(f"a prompt of {width} tokens leaves no room in the context ({model.cfg.context})")
    ids, real = left_padded(prompts, pad_token, device)
    stops = torch.tensor(sorted(stop_ids), device=device)
    cache = KVCache(model.cfg.n_layer)
    ended = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new = []
    inputs = ids
    for _ in range(budget):
        logits = model(inputs, cache=cache, real=real)[:, -1, :]
        token = torch.where(ended, pad_token, sample_next(logits, s, generator))  # a finished row only pads
        new.append(token)
        real = torch.cat([real, ~ended[:, None]], dim=1)
        ended |= torch.isin(token, stops)
        if bool(ended.all()):
            break
        inputs = token[:, None]
    tokens = torch.stack(new, dim=1).tolist()
    counts = real[:, width:].sum(1).tolist()  # a reply's tokens are the real ones after the prompt
    return [(row[:n], bool(e)) for row, n, e in zip(tokens, counts, ended.tolist(), strict=True)]


def default_stop_ids(tok: Tokenizer) -> set[int]:
    return {tok.token_to_id(EOT), tok.token_to_id(IM_END)}


class TextStream:
    """Token ids in, finished text out. A piece is held back while it ends in an unfinished UTF-8
    character (a Chinese character is 3 bytes, often split across tokens) or could be the start of a
    stop string; `stopped` turns True when a stop string appears (it and what follows are dropped)."""

    def __init__(self, tok: Tokenizer, stop: list[str]):
        self.tok, self.stop = tok, [x for x in stop if x]
        self.ids: list[int] = []
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that became final with this token ('' while held back)."""
        self.ids.append(token)
        text = decode(self.tok, self.ids)
        if text.endswith("\ufffd"):
            return ""
        hits = [h for x in self.stop if (h := text.find(x, max(0, self.emitted - len(x)))) >= 0]
        if hits:
            self.stopped = True
            return self._take(text, min(hits))
        safe = len(text)
        for x in self.stop:  # hold back a tail that may grow into a stop string
            for n in range(min(len(x) - 1, len(text)), 0, -1):
                if text.endswith(x[:n]):
                    safe = min(safe, len(text) - n)
                    break
        return self._take(text, safe)

    def flush(self) -> str:
        """Whatever is still held back, once no more tokens will come."""
        if self.stopped:
            return ""
        return self._take(decode(self.tok, self.ids).removesuffix("\ufffd"), None)  # half a character: dropped

    def _take(self, text: str, end: int | None) -> str:
        piece = text[self.emitted : end]
        self.emitted = len(text) if end is None else max(self.emitted, end)
        return piece


def stream_text(model: Transformer, tok: Tokenizer, prompt: str, s: Sampling,
                stop_ids: set[int] | None = None, compile: bool = False) -> Iterator[str]:
    """Yield pieces of the reply as they are decided (see TextStream)."""
    stop_ids = default_stop_ids(tok) if stop_ids is None else stop_ids
    stream = TextStream(tok, s.stop)
    for token in generate_ids(model, encode(tok, prompt), s, stop_ids, compile=compile):
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            return
    if tail := stream.flush():
        yield tail


def generate_text(model: Transformer, tok: Tokenizer, prompt: str, s: Sampling) -> str:
    return "".join(stream_text(model, tok, prompt, s))
