"""A chatforge run as a model of EleutherAI's lm-evaluation-harness, so its hundreds of benchmarks (and
your own task YAMLs) can score our models: `lm_eval --model chatforge --model_args run=runs/demo/sft`
(after `import chatforge.eval.lm_eval_adapter`), or `run_lm_eval(...)` below.

lm-eval asks a model three things; each is answered with the code the rest of chatforge uses:
  loglikelihood          (context, continuation) -> (log p(continuation | context), was it the greedy text?)
  loglikelihood_rolling  (text,) -> log p(text), over windows of the model's context (perplexity tasks)
  generate_until         (context, {"until", "max_gen_toks", "temperature"}) -> generated text
lm_eval is optional (`pip install -e ".[eval]"`): only this module imports it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from chatforge.errors import ChatforgeError
from chatforge.eval.choice import continuation_logprobs, encode_pair
from chatforge.model.generate import Sampling, TextStream, default_stop_ids, generate_ids
from chatforge.model.io import load_run_model
from chatforge.tokenizer import EOT, encode, load_tokenizer
from chatforge.train.device import pick_device

try:
    from lm_eval import simple_evaluate
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
    from lm_eval.tasks import TaskManager
except ImportError:
    raise ChatforgeError('lm-evaluation-harness is not installed; install it with: pip install -e ".[eval]"') from None


@register_model("chatforge")
class ChatforgeLM(LM):
    """The model and tokenizer of one run folder. model_args: "run=DIR[,batch_size=N][,device=auto|cpu|cuda]"."""

    def __init__(self, run: str | Path, batch_size: int | str = 32, device: str = "auto", **unused) -> None:
        super().__init__()
        self.run = Path(run)
        self.model = load_run_model(self.run, pick_device(str(device)))
        self.tok = load_tokenizer(self.run)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32  # "auto" -> a fixed 32
        self.eot = self.tok.token_to_id(EOT)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> ChatforgeLM:
        """`--model_args run=DIR,...`; what it says wins over lm_eval's own --batch_size / --device."""
        args = lm_utils.simple_parse_args_string(arg_string)
        if "run" not in args:
            raise ChatforgeError(f"--model_args {arg_string!r} names no run folder; use run=DIR[,batch_size=N]")
        return cls(**{**{k: v for k, v in (additional_config or {}).items() if v is not None}, **args})

    def get_model_info(self) -> dict:
        return {"model_run": str(self.run), "model_context": self.model.cfg.context}

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tok, context, continuation) for context, continuation in (r.args for r in requests)]
        return continuation_logprobs(self.model, pairs, self.batch_size)

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """log p(text) token by token: the text is cut into windows of the model's context; each window
        predicts tokens no earlier window did (the first one after <|endoftext|>), as lm-eval's HFLM does."""
        windows, owner = [], []
        for i, (text,) in enumerate(r.args for r in requests):
            for window in lm_utils.get_rolling_token_windows(token_list=encode(self.tok, text), prefix_token=self.eot,
                                                             max_seq_len=self.model.cfg.context, context_len=1):
                windows.append(lm_utils.make_disjoint_window(window))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, continuation_logprobs(self.model, windows, self.batch_size), strict=True):
            totals[i] += logprob
        return totals

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Greedy by default (temperature 0); the text ends before the first of `until`, or at
        <|endoftext|> / <|im_end|>, or after max_gen_toks tokens."""
        out = []
        for context, kwargs in (r.args for r in requests):
            kwargs = dict(kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = 0.0 if kwargs.get("do_sample") is False else float(kwargs.get("temperature", 0.0))
            s = Sampling(temperature=temperature, top_k=int(kwargs.get("top_k") or 0),
                         top_p=float(kwargs.get("top_p") or 1.0), max_new_tokens=int(kwargs.get("max_gen_toks", 256)),
                         seed=0)
            stream = TextStream(self.tok, until)
            pieces = []
            for token in generate_ids(self.model, encode(self.tok, context) or [self.eot], s,
                                      default_stop_ids(self.tok)):
                pieces.append(stream.push(token))
                if stream.stopped:
                    break
            out.append("".join(pieces) + stream.flush())
        return out


def run_lm_eval(run_dir: str | Path, tasks: list[str], include_path: str | None = None, limit: int | None = None,
                batch_size: int = 32, device: str = "auto") -> dict:
    """Score a run on lm-eval tasks (built-in ones, or the YAMLs under include_path); returns lm-eval's
    per-task metrics, e.g. {"hellaswag": {"acc,none": 0.27, "acc_stderr,none": ...}}."""
    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t]) and not Path(t).is_file()]
    if unknown:
        where = f" or in {include_path}" if include_path else "; for task YAMLs of your own, give their folder"
        raise ChatforgeError(f"lm-eval task(s) {', '.join(map(repr, unknown))} not found among lm-eval's tasks{where}")
    torch.manual_seed(0)
    results = simple_evaluate(model=ChatforgeLM(run_dir, batch_size, device), tasks=list(tasks), task_manager=manager,
                              limit=limit, log_samples=False)
    return results["results"]
