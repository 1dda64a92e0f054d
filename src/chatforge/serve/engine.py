"""One model serving many conversations at once: continuous batching over a shared KV cache.

Every running request is one row of a left-padded batch (the layout of `generate_batch`): its tokens sit
at the right, pads at the left, and `real` keeps the pads out of attention and positions. Between two
decode steps a request may join (its prompt is prefilled on its own, then its cache rows are padded to
the batch's width and stacked on) or leave (finished, stopped or cancelled: its rows are dropped, and
columns that no remaining row uses are cut off). So a short reply never waits for a long one, and a new
request never waits for the batch to drain (Yu et al., 2022, "Orca"; the scheduling of vLLM).

The engine runs in its own thread; `submit` is safe to call from any thread, and each request's pieces
of text arrive through its `emit` callback, in order, from the engine's thread.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from chatforge.model.generate import Sampling, TextStream, default_stop_ids, left_padded, sample_tokens
from chatforge.model.transformer import KVCache, Transformer


class EngineBusy(Exception):
    """Too many requests are running or waiting; the caller should answer 429."""


@dataclass
class Request:
    prompt_ids: list[int]
    sampling: Sampling  # temperature, top_p, max_new_tokens, stop strings, seed
    emit: Callable[[str, str | None], None]  # (text piece, finish reason: None | "stop" | "length")
    tokens: list[int] = field(default_factory=list)  # the reply so far (a stop token is not kept)
    error: str | None = None  # set when the engine failed on this request (a bug, not the client's doing)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def completion_tokens(self) -> int:
        return len(self.tokens)

    def cancel(self) -> None:
        """Stop generating (a client went away); the row is freed before the next decode step."""
        self.cancelled.set()


@dataclass
class Row:
    request: Request
    stream: TextStream
    generator: torch.Generator | None
    last: int = 0  # the token the next decode step feeds


def sample_rows(logits: torch.Tensor, rows: list[Row]) -> list[int]:
    """One token per row, each with its own request's sampling settings and, when the request has a seed,
    a uniform number from its own random stream, whatever shares its batch: `model.generate.sample_tokens`,
    the sampler `chat` and `generate` use, so a seeded request gets the same reply from both."""
    device = logits.device
    settings = [r.request.sampling for r in rows]
    uniform = torch.rand(len(rows), device=device)
    for i, r in enumerate(rows):
        if r.generator is not None:
            uniform[i] = torch.rand(1, generator=r.generator, device=device)
    return sample_tokens(logits, torch.tensor([s.temperature for s in settings], device=device),
                         torch.tensor([s.top_k for s in settings], device=device),
                         torch.tensor([s.top_p for s in settings], device=device), uniform).tolist()


def pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zeros (or False) added on the left of `dim` up to `width`."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [missing, 0]
    return F.pad(t, pad)


class Engine:
    def __init__(self, model: Transformer, tok: Tokenizer, max_batch: int = 32, max_pending: int = 64,
                 start: bool = True):
        self.model, self.tok = model.eval(), tok
        self.context = model.cfg.context
        self.stop_ids = default_stop_ids(tok)
        self.max_batch, self.max_pending = max_batch, max_pending
        self.prefill_group, self.prefill_wait = 8, 0.05  # see _admit_now
        self.device = next(model.parameters()).device
        self.waiting: deque[Request] = deque()
        self.rows: list[Row] = []
        self.cache: KVCache | None = None
        self.real: torch.Tensor | None = None  # (rows, width) True at real tokens
        self.wake = threading.Condition()
        self.closed = False
        self.steps = 0  # decode steps run, and how many rows they carried (for the batch-size figure)
        self.row_steps = 0
        self.prefills = 0
        self.busy_seconds = 0.0  # time spent in `step`, so busy / wall time is how loaded the engine is
        self.thread = threading.Thread(target=self._loop, name="chatforge-engine", daemon=True)
        if start:  # start=False: the caller drives `step` itself (the tests do, to place joins exactly)
            self.thread.start()

    # ----- the caller's side -----
    def submit(self, request: Request) -> None:
        if not request.prompt_ids or len(request.prompt_ids) >= self.context:
            raise ValueError(f"a prompt needs 1 to {self.context - 1} tokens, got {len(request.prompt_ids)}")
        with self.wake:
            if self.closed:
                raise EngineBusy("the engine is shut down")
            if len(self.waiting) + len(self.rows) >= self.max_pending:
                raise EngineBusy(f"{self.max_pending} requests are already running or waiting")
            self.waiting.append(request)
            self.wake.notify()

    def close(self) -> None:
        with self.wake:
            self.closed = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join(timeout=10)

    @property
    def load(self) -> int:
        return len(self.waiting) + len(self.rows)

    def stats(self) -> dict:
        return {"running_or_waiting": self.load, "decode_steps": self.steps, "prefills": self.prefills,
                "mean_batch": round(self.row_steps / max(self.steps, 1), 2),
                "busy_seconds": round(self.busy_seconds, 2)}

    # ----- the engine's thread -----
    def _loop(self) -> None:
        with torch.inference_mode():  # grad mode is per thread: set it here, not in the caller's
            while True:
                with self.wake:
                    while not (self.waiting or self.rows or self.closed):
                        self.wake.wait()
                    if self.closed:
                        for r in [*self.waiting, *(row.request for row in self.rows)]:
                            r.emit("", "cancelled")
                        return
                    room = self.max_batch - len(self.rows)
                    joining = []
                    if self._admit_now(room):
                        joining = [self.waiting.popleft() for _ in range(min(room, len(self.waiting)))]
                started = time.perf_counter()
                try:
                    self.step(joining)
                except Exception as e:  # a bug must not hang every client: end the requests it touched
                    running = {id(row.request) for row in self.rows}
                    for r in [row.request for row in self.rows] + [r for r in joining if id(r) not in running]:
                        r.error = f"{type(e).__name__}: {e}"
                        r.emit("", "error")
                    self.rows, self.cache, self.real = [], None, None
                self.busy_seconds += time.perf_counter() - started

    def _admit_now(self, room: int) -> bool:
        """Prefill newcomers in groups: a prefill costs about as much for 4 prompts as for 1, so while
        other rows are decoding, wait until a few have gathered or the oldest has waited `prefill_wait`."""
        if not self.waiting or room <= 0:
            return False
        if not self.rows or len(self.waiting) >= min(room, self.prefill_group):
            return True
        return time.perf_counter() - self.waiting[0].arrived >= self.prefill_wait

    def step(self, joining: list[Request]) -> None:
        """Admit `joining` (prefill, first token), then one decode step for every running row."""
        self._keep([not row.request.cancelled.is_set() for row in self.rows])
        joining = [r for r in joining if not r.cancelled.is_set()]
        if joining:
            self._admit(joining)
        if not self.rows:
            return
        inputs = torch.tensor([[row.last] for row in self.rows], device=self.device)
        self.real = torch.cat([self.real, self.real.new_ones(len(self.rows), 1)], dim=1)
        logits = self.model(inputs, cache=self.cache, real=self.real)[:, -1, :]
        self.steps, self.row_steps = self.steps + 1, self.row_steps + len(self.rows)
        self._advance(sample_rows(logits, self.rows))

    def _admit(self, joining: list[Request]) -> None:
        ids, real = left_padded([r.prompt_ids for r in joining], 0, self.device)
        width = ids.shape[1]
        cache = KVCache(self.model.cfg.n_layer)
        logits = self.model(ids, cache=cache, real=real)[:, -1, :]
        self.prefills += 1
        new_rows = []
        for r in joining:
            seed = r.sampling.seed
            generator = None if seed is None else torch.Generator(device=self.device).manual_seed(seed)
            new_rows.append(Row(r, TextStream(self.tok, r.sampling.stop), generator))
        first = sample_rows(logits, new_rows)
        if self.cache is None:
            self.cache, self.real = cache, real
        else:  # stack the newcomers' cache under the running rows', both left-padded to one width
            width = max(self.real.shape[1], width)
            for layer in range(self.model.cfg.n_layer):
                for old, new in ((self.cache.keys, cache.keys), (self.cache.values, cache.values)):
                    old[layer] = torch.cat([pad_left(old[layer], width, 2), pad_left(new[layer], width, 2)])
            self.real = torch.cat([pad_left(self.real, width, 1), pad_left(real, width, 1)])
        self.rows += new_rows
        # only the newcomers got a token this round: the running rows keep theirs for the decode step
        taken = [self._take(row, t) for row, t in zip(new_rows, first, strict=True)]
        self._keep([True] * (len(self.rows) - len(new_rows)) + taken)

    def _advance(self, tokens: list[int]) -> None:
        self._keep([self._take(row, t) for row, t in zip(self.rows, tokens, strict=True)])

    def _take(self, row: Row, token: int) -> bool:
        """Hand `token` to its request; False when the request is finished."""
        r = row.request
        if token in self.stop_ids:
            r.emit(row.stream.flush(), "stop")
            return False
        r.tokens.append(token)
        row.last = token
        piece = row.stream.push(token)
        if row.stream.stopped:
            r.emit(piece, "stop")
            return False
        if r.completion_tokens >= r.sampling.max_new_tokens or len(r.prompt_ids) + r.completion_tokens >= self.context:
            r.emit(piece + row.stream.flush(), "length")
            return False
        if piece:
            r.emit(piece, None)
        return True

    def _keep(self, keep: list[bool]) -> None:
        """Drop the rows marked False, then the leading columns no remaining row uses."""
        if all(keep):
            return
        index = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=self.device)
        self.rows = [row for row, k in zip(self.rows, keep, strict=True) if k]
        if not self.rows:
            self.cache, self.real = None, None
            return
        self.real = self.real[index]
        start = int(self.real.any(dim=0).long().argmax())  # first column some row still uses
        self.real = self.real[:, start:]
        for layer in range(self.model.cfg.n_layer):
            self.cache.keys[layer] = self.cache.keys[layer][index, :, start:]
            self.cache.values[layer] = self.cache.values[layer][index, :, start:]
