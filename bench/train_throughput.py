"""Tokens/s and MFU of one full training step (forward, backward, clip, AdamW) at the reference config,
in fp32 and bf16, against this machine's peak matmul FLOP/s measured in the same run.

    python bench/train_throughput.py            # ~1 minute on 2 CPU cores
    python bench/train_throughput.py --style llama --json out.json

Goals: MFU >= 75% of the fp32 peak in fp32, >= 60% of the bf16 peak in bf16. A benchmark, not a test:
it prints PASS/BELOW and exits 0 either way.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from chatforge.config import TrainConfig
from chatforge.model.transformer import ModelConfig, Transformer
from chatforge.train.device import autocast, bf16_supported, peak_matmul_flops, pick_device
from chatforge.train.loop import build_optimizer

GOALS = {"fp32": 0.75, "bf16": 0.60}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def measure(style: str, dtype: torch.dtype, steps: int, warmup: int, device: torch.device, compile_: bool) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(style=style, vocab_size=8192, context=256, n_layer=6, n_head=6, d_model=384, bias=False)
    model = Transformer(cfg).to(device)
    train_cfg = TrainConfig(device=device.type)
    optimizer = build_optimizer(model, train_cfg, device)
    forward = torch.compile(model) if compile_ else model
    batch = torch.randint(0, cfg.vocab_size, (8, cfg.context + 1), device=device)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with autocast(device, dtype):
            loss = forward(x, targets=y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tokens_per_s = steps * x.numel() / (time.perf_counter() - t)
    return {"tokens_per_s": tokens_per_s, "flops": model.flops_per_token() * tokens_per_s,
            "params": model.num_params()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--style", choices=["gpt2", "llama"], default="gpt2")
    p.add_argument("--steps", type=int, default=10, help="timed steps per precision")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    device = pick_device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}, device {device}")
    precisions = {"fp32": torch.float32}
    if bf16_supported(device):
        precisions["bf16"] = torch.bfloat16
    results = {}
    for name, dtype in precisions.items():
        peak = peak_matmul_flops(device, dtype, n=2048, seconds=2.0)
        r = measure(args.style, dtype, args.steps, args.warmup, device, args.compile)
        r.update(peak=peak, mfu=r["flops"] / peak, goal=GOALS[name])
        results[name] = r
        verdict = "PASS" if r["mfu"] >= r["goal"] else "BELOW"
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s, {r['flops'] / 1e12:.3f} TFLOP/s achieved, "
              f"peak {peak / 1e12:.3f} TFLOP/s, MFU {r['mfu']:.1%} (goal {r['goal']:.0%}: {verdict}, "
              f"ratio to goal {r['mfu'] / r['goal']:.2f})")
    if "bf16" in results:
        print(f"bf16 / fp32 tokens/s: {results['bf16']['tokens_per_s'] / results['fp32']['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"style": args.style, "cpu": cpu_name(), "torch": torch.__version__, **results}, f, indent=2)


if __name__ == "__main__":
    main()
