"""Tokens/s and MFU of one full training step (forward, loss backward, grad clip, AdamW step, zero_grad)
at the reference config, in fp32 and in bf16 (autocast, fp32 master weights), against this machine's
peak matmul FLOP/s in the same precision, measured in the same run.

    python bench/train_throughput.py                 # ~1 minute on 2 CPU cores
    python bench/train_throughput.py --style llama --json out.json
    python bench/train_throughput.py --compile       # the same with torch.compile (compiles first)
    python bench/train_throughput.py --config configs/gpt2-124m.toml --batch 16 --precision bf16 --compile
                                                     # GPT-2 small on a GPU (scripts/gpu_check.sh runs it)
    python bench/train_throughput.py --config configs/gpt2-124m.toml --moe 8,2,1536   # 8 half-size experts, top-2

Reference config (without --config): 6 layers, 6 heads, d_model 384, context 256, vocabulary 8192, batch 8,
no biases. With --config PATH the [model] table of that TOML is the model and its context the sequence length.
Achieved FLOP/s = Transformer.flops_per_token() x tokens/s; peak = the best FLOP/s of a plain square
matmul, the best of a few sizes (chatforge.train.device.peak_matmul_flops; on a 2-core AMD EPYC,
512..1024 beat 2048 by 5-10%, so the best size, not the biggest, is the honest denominator);
MFU = achieved / peak. --peak-tflops X makes X TFLOP/s the denominator instead (a datasheet's dense peak).
On CUDA: TF32 is on for fp32 matmuls (as in training), the peak matmuls are larger (2048..8192), peak GPU
memory is reported, and where torch.cuda.get_device_name() is a known GPU the MFU against NVIDIA's
datasheet dense peak is printed too (DATASHEET_TFLOPS).

Goals: MFU >= 75% of the fp32 peak in fp32, >= 60% of the bf16 peak in bf16. A benchmark, not a test:
it prints PASS/BELOW and exits 0 either way. Other processes on the same cores lower every number:
the CPU use just before the run is printed first.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import re
import statistics
import time

import torch

from chatforge.config import TrainConfig, load_config
from chatforge.model.moe import MoEConfig, pop_aux_loss
from chatforge.model.transformer import ModelConfig, Transformer
from chatforge.train.device import autocast, bf16_supported, peak_matmul_flops, pick_device
from chatforge.train.loop import build_optimizer

GOALS = {"fp32": 0.75, "bf16": 0.60}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REFERENCE_MODEL = dict(vocab_size=8192, context=256, n_layer=6, n_head=6, d_model=384, bias=False)
PEAK_SIZES = {"cpu": "512,1024,2048", "cuda": "2048,4096,8192"}

# Dense (no sparsity) tensor-core peaks in TFLOP/s, from NVIDIA's datasheets (the datasheets print the
# 2:4-sparsity figures, twice these). "fp32" is TF32, which fp32 matmuls use once allow_tf32 is on.
# The first pattern that matches torch.cuda.get_device_name() wins, so the specific parts come first.
DATASHEET_TFLOPS = [
    # (regex on the device name, part, {precision: dense TFLOP/s}, source)
    (r"GH200", "GH200", {"bf16": 989.4, "fp32": 494.7}, "NVIDIA GH200 Grace Hopper Superchip datasheet"),
    (r"H100.*PCIe", "H100 PCIe", {"bf16": 756.5, "fp32": 378.0}, "NVIDIA H100 Tensor Core GPU datasheet"),
    (r"H100.*NVL", "H100 NVL", {"bf16": 835.5, "fp32": 417.5}, "NVIDIA H100 Tensor Core GPU datasheet"),
    (r"H200.*NVL", "H200 NVL", {"bf16": 835.5, "fp32": 417.5}, "NVIDIA H200 Tensor Core GPU datasheet"),
    (r"H100", "H100 SXM", {"bf16": 989.4, "fp32": 494.7}, "NVIDIA H100 Tensor Core GPU datasheet"),
    (r"H200", "H200 SXM", {"bf16": 989.4, "fp32": 494.7}, "NVIDIA H200 Tensor Core GPU datasheet"),
    (r"A100", "A100", {"bf16": 312.0, "fp32": 156.0}, "NVIDIA A100 Tensor Core GPU datasheet"),
    (r"\bL4\b", "L4", {"bf16": 121.0, "fp32": 60.0}, "NVIDIA L4 Tensor Core GPU datasheet"),
]


def datasheet_peak(device_name: str, precision: str) -> tuple[str, float, str] | None:
    """(part, dense peak FLOP/s, source) for a known GPU name, else None."""
    for pattern, part, tflops, source in DATASHEET_TFLOPS:
        if re.search(pattern, device_name, re.IGNORECASE):
            return part, tflops[precision] * 1e12, source
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_busy(seconds: float = 1.0) -> float | None:
    """Fraction of all CPUs busy (from /proc/stat) over `seconds` before the run: other people's work."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    try:
        total0, idle0 = sample()
        time.sleep(seconds)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return 1.0 - (idle1 - idle0) / max(total1 - total0, 1)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_config(args: argparse.Namespace) -> ModelConfig:
    """The [model] table of --config (vocabulary 50257 where it says 0), else the reference config."""
    if args.config:
        cfg = load_config(args.config).model
        if not cfg.vocab_size:
            cfg.vocab_size = 50257  # the GPT-2 vocabulary: a config that takes its vocabulary from the data
    else:
        cfg = ModelConfig(style="gpt2", **REFERENCE_MODEL)
    if args.style:
        cfg.style = args.style
    if args.moe:  # E,K[,H]: every block's MLP becomes E experts (hidden size H, default the MLP's), top-K
        n_experts, top_k, *hidden = (int(v) for v in args.moe.split(","))
        cfg.moe = MoEConfig(n_experts=n_experts, top_k=top_k, d_expert=hidden[0] if hidden else 0)
    return cfg


def measure(args: argparse.Namespace, cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict:
    """Warm up, then time `args.steps` full training steps; tokens/s over the whole timed span."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model = Transformer(cfg).to(device)
    model.train()
    train_cfg = TrainConfig(device=device.type, batch_size=args.batch)
    optimizer = build_optimizer(model, train_cfg, device)
    forward = torch.compile(model) if args.compile else model
    batch = torch.randint(0, cfg.vocab_size, (args.batch, cfg.context + 1), device=device)
    x, y = batch[:, :-1], batch[:, 1:]

    def step() -> None:
        with autocast(device, dtype):
            loss = forward(x, targets=y)
            aux = pop_aux_loss(model)  # a mixture of experts' balance and z-losses, as the training loop adds
        (loss if aux is None else loss + aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync(device)
    warmup_s = time.perf_counter() - t
    times = []
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    # CPU time this process got per thread per second: well under 1 when other processes took the cores.
    cpu_share = (time.process_time() - cpu_start) / elapsed / torch.get_num_threads()
    tokens_per_s = args.steps * x.numel() / elapsed
    memory = {}
    if device.type == "cuda":
        memory = {"peak_memory_allocated_bytes": torch.cuda.max_memory_allocated(device),
                  "peak_memory_reserved_bytes": torch.cuda.max_memory_reserved(device)}
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_step": x.numel(),
        "flops_per_token": model.flops_per_token(),
        "achieved_flops": model.flops_per_token() * tokens_per_s,
        "params": model.num_params(),
        "active_params": model.active_params(),
        "warmup_s": warmup_s,
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_min": 1e3 * min(times),
        "step_ms_max": 1e3 * max(times),
        "cpu_share": cpu_share,
        **memory,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="PATH",
                   help="take the model from this TOML's [model] table, its context the sequence length "
                        "(e.g. configs/gpt2-124m.toml; default: the reference config above)")
    p.add_argument("--style", choices=["gpt2", "llama"], default=None,
                   help="model style (default: the config's, gpt2 for the reference config)")
    p.add_argument("--moe", metavar="E,K[,H]",
                   help="a mixture of E experts (hidden size H), top-K, in every block (docs/moe.md)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per precision (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--batch", type=int, default=8, help="sequences per step, each of the config's context (default 8)")
    p.add_argument("--precision", choices=["both", "fp32", "bf16"], default="both")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default auto)")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (compile time is in warm-up)")
    p.add_argument("--peak-sizes", default=None,
                   help="sides of the square peak matmuls; the best FLOP/s of them is the peak "
                        "(default 512,1024,2048 on CPU, 2048,4096,8192 on CUDA)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="X",
                   help="MFU's denominator: X TFLOP/s (a datasheet's dense peak, e.g. 989.4 for H100/H200 SXM bf16) "
                        "instead of the measured matmul peak, which is then not measured")
    p.add_argument("--peak-seconds", type=float, default=1.0,
                   help="time to search the peak per size, half before and half after the steps (default 1)")
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA GPU")
    cfg = model_config(args)
    gpu = ""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 matmuls on tensor cores, as training does
        torch.backends.cudnn.allow_tf32 = True
        gpu = torch.cuda.get_device_name(device)
    busy = cpu_busy()
    info = {
        "date": datetime.date.today().isoformat(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "cpu": cpu_name(),
        "device": str(device),
        "style": cfg.style,
        "config": args.config or "reference",
        "model": dataclasses.asdict(cfg),
        "seq_len": cfg.context,
        "batch": args.batch,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "cpu_busy_before": busy,
    }
    if device.type == "cuda":
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info.update(gpu=gpu, cuda=torch.version.cuda, capability=capability, tf32=True,
                    gpu_memory_bytes=torch.cuda.get_device_properties(device).total_memory)
    print(f"torch {info['torch']}, {info['threads']} threads, {info['cpus']} CPUs, {info['cpu']}, "
          f"device {device}{f' ({gpu})' if gpu else ''}, style {cfg.style}, batch {args.batch}, "
          f"{args.steps} timed steps{', torch.compile' if args.compile else ''}")
    if args.config:
        print(f"model from {args.config}: {cfg.n_layer} layers, {cfg.n_head} heads, d_model {cfg.d_model}, "
              f"context {cfg.context} (the sequence length), vocabulary {cfg.vocab_size}")
    if busy is not None:
        warning = " (other processes share these cores: the numbers will be low and noisy)" if busy > 0.1 else ""
        print(f"CPU busy in the second before the run: {busy:.0%}{warning}")

    sizes = [int(n) for n in (args.peak_sizes or PEAK_SIZES.get(device.type, PEAK_SIZES["cpu"])).split(",")]
    names = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    if "bf16" in names and not bf16_supported(device):
        print("bf16: not supported on this device, skipped")
        names.remove("bf16")
    results = {}
    for name in names:
        dtype = DTYPES[name]
        measured = args.peak_tflops is None
        # The peak is searched before and after the training steps and the best kept, so a moment of
        # contention during the search cannot lower the peak (and flatter the MFU).
        if measured:
            peaks = {n: peak_matmul_flops(device, dtype, n=n, seconds=args.peak_seconds / 2) for n in sizes}
        r = measure(args, cfg, dtype, device)
        if measured:
            for n in sizes:
                peaks[n] = max(peaks[n], peak_matmul_flops(device, dtype, n=n, seconds=args.peak_seconds / 2))
            peak_size = max(peaks, key=peaks.get)
            peak = peaks[peak_size]
            r.update(peak_flops=peak, peak_size=peak_size, peak_flops_by_size={str(n): f for n, f in peaks.items()},
                     mfu_denominator="measured matmul peak")
        else:
            peak = args.peak_tflops * 1e12
            r.update(peak_flops=peak, mfu_denominator="--peak-tflops")
        r.update(mfu=r["achieved_flops"] / peak, goal=GOALS[name])
        r["met"] = r["mfu"] >= r["goal"]
        sheet = datasheet_peak(gpu, name) if gpu else None
        if sheet:
            part, sheet_peak, source = sheet
            r.update(datasheet_part=part, datasheet_peak_flops=sheet_peak, datasheet_source=source,
                     mfu_datasheet=r["achieved_flops"] / sheet_peak)
        results[name] = r
        print(f"{name}: {r['tokens_per_s']:,.0f} tokens/s "
              f"(step median {r['step_ms_median']:.0f} ms, min {r['step_ms_min']:.0f}, max {r['step_ms_max']:.0f}; "
              f"warm-up {r['warmup_s']:.1f} s)")
        if device.type == "cpu":
            shared = "" if r["cpu_share"] > 0.9 else ": other processes took CPU time, the numbers are low"
            print(f"  CPU time got by the {torch.get_num_threads()} threads: {r['cpu_share']:.0%}{shared}")
        if "peak_memory_allocated_bytes" in r:
            print(f"  peak GPU memory: {r['peak_memory_allocated_bytes'] / 2**30:.2f} GiB allocated, "
                  f"{r['peak_memory_reserved_bytes'] / 2**30:.2f} GiB reserved")
        if measured:
            denominator = (f"measured matmul peak {peak / 1e12:.3f} TFLOP/s "
                           f"(best of {', '.join(f'{n}: {f / 1e12:.3f}' for n, f in peaks.items())})")
        else:
            denominator = f"--peak-tflops {args.peak_tflops:g} TFLOP/s (given, not measured)"
        print(f"  achieved {r['achieved_flops'] / 1e12:.3f} TFLOP/s ({r['flops_per_token'] / 1e6:.1f} MFLOP/token), "
              f"MFU {r['mfu']:.1%} against the {denominator}")
        if sheet:
            kind = "TF32" if name == "fp32" else "bf16"
            print(f"  MFU {r['mfu_datasheet']:.1%} against the {part} dense {kind} peak "
                  f"{sheet_peak / 1e12:.1f} TFLOP/s ({source})")
        elif gpu:
            print(f"  no datasheet peak known for '{gpu}': pass --peak-tflops for one")
        print(f"  goal MFU >= {r['goal']:.0%}: {'PASS' if r['met'] else 'BELOW'} "
              f"(MFU / goal = {r['mfu'] / r['goal']:.2f})")
    if "fp32" in results and "bf16" in results:
        print(f"bf16 / fp32 tokens/s: {results['bf16']['tokens_per_s'] / results['fp32']['tokens_per_s']:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**info, "results": results}, f, indent=2)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
