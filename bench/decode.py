"""Greedy decode speed: chatforge's KV-cache generator at batch 1 (eager, and compiled over a static cache)
and batch 16, against a naive loop that
re-runs the whole sequence for every token (no cache), and against Hugging Face transformers'
`generate()` on the identical weights (exported with chatforge.interop.hf), all measured in this run.

    python bench/decode.py                      # the demo model's shape, random weights, ~1 minute
    python bench/decode.py --run runs/demo/sft  # a trained run

Every row generates exactly --new tokens after a --prompt-token prompt (no early stop), eval mode, in
--dtype (fp32 or bf16; transformers runs in the same). One more row quantizes the same weights to int8
(weight-only, bf16 activations: chatforge.model.quantize) and says how many greedy tokens stay the same.
Each figure is the median of --repeats runs taken in turns with the others, as this shared machine's speed drifts.
Goal (the serving issue): at least 3x transformers' tokens/s at batch 1 on CPU. A benchmark, not a
test: it prints the ratios and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from chatforge.config import load_config
from chatforge.interop.hf import hf_config, to_hf_tensors
from chatforge.model.generate import Sampling, generate_batch, generate_ids
from chatforge.model.io import load_run_model
from chatforge.model.quantize import quantize_int8
from chatforge.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]


def interleaved_medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per call of each function, the median of `repeats`, taken in turns (a, b, c, a, b, c, ...)
    so that a slow spell of a shared machine falls on every contender alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run folder (default: the demo config's shape, random weights)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both libraries run in it")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.run:
        model = load_run_model(args.run)
    else:
        cfg = load_config(REPO / "configs" / "demo.toml", ["model.vocab_size=4096"]).model
        model = Transformer(cfg).eval()
    cfg = model.cfg
    never = {cfg.vocab_size + 1}  # no id stops a row: every row makes exactly --new tokens
    s = Sampling(temperature=0.0, max_new_tokens=args.new)
    prompts = torch.randint(0, cfg.vocab_size, (16, args.prompt_tokens)).tolist()
    print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}; {model.num_params():,} params ({cfg.style}), prompt {args.prompt_tokens}, "
          f"{args.new} new tokens, greedy, {args.dtype}, median of {args.repeats} interleaved runs")

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = model.to(dtype)
    runs: dict[str, tuple[int, Callable[[], object]]] = {
        "chatforge, KV cache": (1, lambda: list(generate_ids(model, prompts[0], s, never))),
        "chatforge, compiled, static cache": (1, lambda: list(generate_ids(model, prompts[0], s, never, compile=True))),
        "chatforge, KV cache, batched": (16, lambda: generate_batch(model, prompts, s, never, pad_token=0)),
    }
    int8 = quantize_int8(model)  # weight-only int8, bf16 activations: same weights, a quarter of fp32's bytes
    runs["chatforge, int8 weights, compiled"] = (
        1, lambda: list(generate_ids(int8, prompts[0], s, never, compile=True)))
    with torch.no_grad():
        list(generate_ids(model, prompts[0], s, never, compile=True))  # compiles (seconds to a minute), not timed
        list(generate_ids(int8, prompts[0], s, never, compile=True))
        pairs = zip(generate_ids(int8, prompts[0], s, never), generate_ids(model, prompts[0], s, never), strict=True)
        same = sum(a == b for a, b in pairs)
        print(f"int8 weights: {same} of {args.new} greedy tokens the same as {args.dtype}'s")
        try:
            import transformers
        except ImportError:
            transformers = None
            print("(transformers is not installed: `pip install transformers` for the comparison)")
        if transformers is not None:
            hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_table(model)))
            hf.load_state_dict(to_hf_tensors(model), strict=False)  # a tied lm_head is not a tensor of its own
            hf.tie_weights()
            hf.to(dtype).eval()
            gap = (hf(torch.tensor(prompts[:2])).logits - model(torch.tensor(prompts[:2]))).abs().max().item()
            print(f"same weights: largest logit difference, transformers vs chatforge, {gap:.1e}")
            for batch in (1, 16):
                x = torch.tensor(prompts[:batch])
                runs[f"transformers generate() b{batch}"] = (batch, lambda x=x: hf.generate(
                    x, max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False, pad_token_id=0))
        seconds = interleaved_medians({name: fn for name, (_, fn) in runs.items()}, args.repeats)
        naive = args.new / interleaved_medians(
            {"naive": lambda: list(generate_ids(model, prompts[0], s, never, use_cache=False))}, 1)["naive"]
    rows = [(name.removesuffix(f" b{batch}"), batch, batch * args.new / seconds[name])
            for name, (batch, _) in runs.items()]
    rows.insert(2, ("naive loop, no cache", 1, naive))

    base = {b: tps for name, b, tps in rows if name.startswith("transformers")}
    print(f"{'generator':<32}{'batch':>6}{'tokens/s':>12}{'vs naive':>10}{'vs transformers':>17}")
    for name, batch, tps in rows:
        vs_hf = f"{tps / base[batch]:.2f}x" if batch in base else "-"
        print(f"{name:<32}{batch:>6}{tps:>12,.0f}{tps / naive:>9.1f}x{vs_hf:>17}")
    if 1 in base:
        for name, _, tps in [r for r in rows if r[1] == 1 and r[0].startswith("chatforge")]:
            ratio = tps / base[1]
            print(f"goal: >= 3x transformers at batch 1, {name}: {ratio:.2f}x -> {'PASS' if ratio >= 3 else 'BELOW'}")


def hf_table(model: Transformer) -> dict:
    """transformers' config for these weights: the one `chatforge export` writes, without token names."""

    class NoTokens:
        def token_to_id(self, _token: str) -> None:
            return None

    table = hf_config(model.cfg, NoTokens())
    table.pop("architectures")
    return table


if __name__ == "__main__":
    main()
