"""Dense against mixture-of-experts pre-training on the demo corpus: held-out bits per byte at equal steps
(the same tokens) and at equal training time, training tokens/s and batch-1 decode tokens/s, all measured
in the same run on the same machine.

    python bench/moe.py                          # about 20 minutes on 2 CPU cores
    python bench/moe.py --precision fp32 --json runs/bench-moe/fp32.json
    python bench/moe.py --steps 100 --only dense,4x1   # a quick look

Every run is the demo's pre-training (configs/demo.toml: Llama style, 4 × 256, context 128, 420 steps of
16 × 128 tokens) with the variant's `model.moe` overrides, on the demo's token shards (built first if
runs/demo/data is missing). "Equal time" trains an MoE variant for 420 × (its tokens/s ÷ dense tokens/s)
steps, so it sees fewer tokens in the dense run's time. Active parameters are what one token computes with
(`Transformer.active_params`). A benchmark, not a test: it prints the table and exits 0 whoever wins.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

from chatforge.config import load_config
from chatforge.model.generate import Sampling, generate_ids
from chatforge.model.io import load_run_model
from chatforge.report.plots import plot_expert_usage
from chatforge.stages.pretrain import run_pretrain

REPO = Path(__file__).resolve().parents[1]
HALF = 352  # half the demo model's SwiGLU hidden size (704): top-2 of these computes what one dense MLP does
VARIANTS = {
    "dense": [],
    "4x1": ["model.moe.n_experts=4", "model.moe.top_k=1"],
    "4x2-half": ["model.moe.n_experts=4", "model.moe.top_k=2", f"model.moe.d_expert={HALF}"],
    "8x1": ["model.moe.n_experts=8", "model.moe.top_k=1"],
    "8x2-half": ["model.moe.n_experts=8", "model.moe.top_k=2", f"model.moe.d_expert={HALF}"],
}
NAMES = {"dense": "dense", "4x1": "4 experts, top-1", "4x2-half": "4 half-size experts, top-2",
         "8x1": "8 experts, top-1", "8x2-half": "8 half-size experts, top-2"}


def demo_data(work: Path) -> Path:
    """runs/demo/data if `make demo` made it, else the same tokenizer and shards built under `work`."""
    if (REPO / "runs/demo/data/meta.json").is_file():
        return REPO / "runs/demo/data"
    from chatforge.data.readers import iter_corpus
    from chatforge.data.shards import prepare
    from chatforge.demo import CORPUS
    from chatforge.tokenizer import save_tokenizer, train_tokenizer

    if not (work / "data/meta.json").is_file():
        save_tokenizer(train_tokenizer(lambda: iter_corpus([CORPUS]), 4096), work / "tokenizer")
        prepare([str(CORPUS)], work / "tokenizer", work / "data")
    return work / "data"


def train_variant(name: str, steps: int, data: Path, work: Path, precision: str, seed: int) -> dict:
    out = work / f"{name}-{steps}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(REPO / "configs/demo.toml", [f"data.dir={data}", f"train.steps={steps}", "train.log_every=5",
                                                   f"train.eval_every={steps}", "train.eval_batches=32",
                                                   f"train.checkpoint_every={steps}", f"train.precision={precision}",
                                                   f"train.seed={seed}",
                                                   *VARIANTS[name]])
    t0 = time.perf_counter()
    result = run_pretrain(cfg, out)
    seconds = time.perf_counter() - t0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    model = load_run_model(out)
    last = rows[-1]
    return {"variant": name, "steps": steps, "seconds": round(seconds, 1), "val_bpb": result["val_bpb"],
            "params": model.num_params(), "active_params": model.active_params(),
            "train_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]),
            "folder": str(out), "router_entropy": last.get("router_entropy"),
            "expert_share_max": last.get("expert_share_max"), "balance": last.get("moe_balance"),
            "metrics": rows}


def decode_speeds(runs: dict[str, Path], new: int = 64, repeats: int = 9) -> dict[str, float]:
    """Batch-1 greedy decode tokens/s with the KV cache (eager) of each run's model, the models taking turns
    (so a slow second of the machine falls on all of them), median of `repeats` after two warm-up rounds."""
    models = {name: load_run_model(folder) for name, folder in runs.items()}
    greedy, times = Sampling(temperature=0, max_new_tokens=new), {name: [] for name in runs}
    for _ in range(repeats + 2):
        for name, model in models.items():
            t0 = time.perf_counter()
            n = len(list(generate_ids(model, [1, 2, 3], greedy, set())))
            times[name].append(n / (time.perf_counter() - t0))
    return {name: statistics.median(t[2:]) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=420, help="the dense run's steps (the demo's: 420)")
    parser.add_argument("--precision", default="auto", help="auto (bf16 where native) | fp32 | bf16")
    parser.add_argument("--seed", type=int, default=1337, help="train.seed of every run (the demo's: 1337)")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants: " + ", ".join(VARIANTS))
    parser.add_argument("--work", default="runs/bench-moe", help="where the runs go")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write the expert-usage plot of the equal-steps runs here (a .png)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = demo_data(work)
    names = args.only.split(",")
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"precision {args.precision}")
    same_steps = {name: train_variant(name, args.steps, data, work, args.precision, args.seed) for name in names}
    dense = same_steps.get("dense")
    same_time = {}
    if dense:
        for name in names[1:] if names[0] == "dense" else names:
            if name != "dense":
                ratio = same_steps[name]["train_tokens_per_s"] / dense["train_tokens_per_s"]
                same_time[name] = train_variant(name, max(10, round(args.steps * ratio)), data, work, args.precision,
                                              args.seed)
    for name, speed in decode_speeds({n: Path(r["folder"]) for n, r in same_steps.items()}).items():
        same_steps[name]["decode_tokens_per_s"] = speed
    header = (f"{'variant':<28} {'params':>9} {'active':>9} {'train tok/s':>11} {'decode tok/s':>12} "
              f"{'bpb, equal steps':>16} {'bpb, equal time (steps)':>24} {'entropy':>7} {'max share':>9}")
    print(header)
    for name, r in same_steps.items():
        timed = same_time.get(name, r if name == "dense" else None)
        at_time = f"{timed['val_bpb']:.4f} ({timed['steps']})" if timed else "—"
        entropy = f"{r['router_entropy']:.2f}" if r["router_entropy"] is not None else "—"
        share = f"{r['expert_share_max']:.2f}" if r["expert_share_max"] is not None else "—"
        print(f"{NAMES[name]:<28} {r['params'] / 1e6:>8.2f}M {r['active_params'] / 1e6:>8.2f}M "
              f"{r['train_tokens_per_s']:>11,.0f} {r['decode_tokens_per_s']:>12,.0f} {r['val_bpb']:>16.4f} "
              f"{at_time:>24} {entropy:>7} {share:>9}")
    if args.plot:
        info = {"metrics": {NAMES[n]: r["metrics"] for n, r in same_steps.items() if n != "dense"}}
        plot = Path(args.plot)
        plot_expert_usage(info, plot.parent, plot.name)
        print(f"expert usage: {plot}")
    if args.json:
        strip = lambda runs: {n: {k: v for k, v in r.items() if k != "metrics"} for n, r in runs.items()}  # noqa: E731
        Path(args.json).write_text(json.dumps({"cpu": torch.backends.cpu.get_cpu_capability(),
                                               "precision": args.precision, "equal_steps": strip(same_steps),
                                               "equal_time": strip(same_time)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
