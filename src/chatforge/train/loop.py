"""The one training loop every stage shares.

It owns the device, precision, optimizer, schedule, gradient accumulation and clipping, logging,
evaluation, checkpoints and resume. A stage supplies only a `Stage`: how to get its next batch, its
loss, and its held-out evaluation.
"""

from __future__ import annotations

import copy
import json
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from chatforge.config import Config, TrainConfig, config_differences, config_to_dict, dump_toml
from chatforge.errors import ChatforgeError
from chatforge.model.moe import pop_aux_loss, routing_metrics
from chatforge.train import distributed as dist
from chatforge.train.checkpoint import full_model_state, load_checkpoint, resolve_checkpoint, save_checkpoint
from chatforge.train.device import autocast, peak_matmul_flops, pick_device, pick_dtype
from chatforge.train.schedule import lr_at


@dataclass
class Stage:
    """What a stage gives the loop."""

    name: str
    next_batch: Callable[[], object]  # one micro-batch of training data
    loss: Callable[[torch.nn.Module, object], torch.Tensor]  # the loss of that batch
    tokens: Callable[[object], int]  # the tokens one micro-batch trains on, on this rank: tokens/s and MFU
    evaluate: Callable[[torch.nn.Module], dict] | None = None  # held-out numbers
    data_state: Callable[[], dict] = field(default=lambda: {})  # the data position, to checkpoint
    load_data_state: Callable[[dict], None] = field(default=lambda state: None)
    metrics: Callable[[], dict] = field(default=lambda: {})  # the stage's own numbers, logged with each step
    # DDP: False where the loss calls parts of the model (PPO's policy and value head) rather than the model
    # itself; the loop then averages the gradients across ranks after backward. Such a stage cannot use FSDP.
    ddp_wrap: bool = True


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only, not on biases, norms (Loshchilov & Hutter, 2019)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu"))


class MetricsLog:
    """metrics.jsonl (one JSON object per log step) and TensorBoard events."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():  # drop what was logged after the checkpoint: it will be logged again
            keep = [line for line in self.path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, int | float):
                    self.tb.add_scalar(key, value, record["step"])
                elif isinstance(value, list):  # one curve per number (a mixture's expert_share: one per expert)
                    for j, item in enumerate(value):
                        if isinstance(item, int | float):
                            self.tb.add_scalar(f"{key}/{j}", item, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def check_resume_config(run_dir: Path, config: dict) -> None:
    import tomllib

    saved_path = run_dir / "config.toml"
    if not saved_path.is_file():
        return
    changed = config_differences(tomllib.loads(saved_path.read_text()), config)
    if changed:
        raise ChatforgeError(
            f"{saved_path}: cannot resume with a changed config ({', '.join(changed)} differ); "
            "undo the change, or start a new run folder"
        )


def train(model: torch.nn.Module, stage: Stage, config: Config, run_dir: str | Path,
          resume: str | None = None) -> dict:
    """Train `model` on `stage` for cfg.steps optimizer steps; returns the last evaluation's numbers.
    Under torchrun with train.parallel=ddp|fsdp every rank runs this; rank 0 logs and writes files."""
    cfg, saved = config.train, config_to_dict(config)  # saved: the whole config, as config.toml keeps it
    run_dir = Path(run_dir)
    if resume is None and (run_dir / "checkpoints").exists():  # every stage: never overwrite a run
        raise ChatforgeError(f"{run_dir}: a run is already here; continue it with --resume or choose another --out")
    device = pick_device(cfg.device)
    dist.setup(cfg.parallel, device)
    device = dist.local_device(device)
    rank, world = dist.rank_world()
    main = rank == 0
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    dtype = pick_dtype(cfg.precision, device)
    if device.type == "cuda":  # the GPU fast path: TF32 for what stays fp32; SDPA picks flash attention itself
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    model.to(device)
    fsdp = cfg.parallel == "fsdp"
    if fsdp and not stage.ddp_wrap:
        raise ChatforgeError(f"{stage.name}: train.parallel=fsdp is not supported for this stage; use ddp")
    # FSDP shards a copy, so the stage's `model` stays an ordinary module that gets the trained weights back
    trained = copy.deepcopy(model) if fsdp else model
    if cfg.activation_checkpointing:  # before sharding, so FSDP's hooks wrap the recomputing blocks
        checkpoint_activations(trained)
    if fsdp:
        dist.wrap(trained, "fsdp", device, dtype)
    optimizer = build_optimizer(trained, cfg, device)
    step = 0
    if resume is not None:
        check_resume_config(run_dir, saved)
        meta = load_checkpoint(resolve_checkpoint(run_dir, resume), trained, optimizer)
        step = meta["step"]
        stage.load_data_state(meta["data"])
    else:
        torch.manual_seed(cfg.seed)
    forward = trained
    if cfg.parallel == "ddp" and stage.ddp_wrap:
        forward = dist.wrap(model, "ddp", device, dtype)
    if main:
        (run_dir / "config.toml").write_text(dump_toml(saved))
    forward = torch.compile(forward) if use_compile(cfg.compile, device) else forward
    log = MetricsLog(run_dir, step if resume is not None else None) if main else None
    peak = peak_matmul_flops(device, dtype) * world
    flops_per_token = model.flops_per_token() if hasattr(model, "flops_per_token") else 0.0
    # FSDP2's policy computes in `dtype` already; autocast on top would only re-cast
    step_dtype = torch.float32 if fsdp else dtype

    stop_signal: list[int] = []
    handlers = {}
    if world == 1:  # a single process stops at a step boundary; torchrun's ranks stop together, by its signal
        handlers = {s: signal.signal(s, lambda signum, frame: stop_signal.append(signum))
                    for s in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint() -> None:
        save_checkpoint(run_dir, step, trained, optimizer, {"data": stage.data_state()}, cfg.keep_checkpoints,
                        sharded=fsdp)

    evaluation: dict = {}
    bad_steps, warned_collapse = 0, False
    bar = tqdm(total=cfg.steps, initial=step, desc=stage.name, unit="step", dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 15, disable=not main)
    try:
        trained.train()
        while step < cfg.steps:
            t0 = time.perf_counter()
            lr = lr_at(step, cfg.lr, cfg.min_lr, cfg.warmup_steps, cfg.steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, tokens, batch_s = 0.0, 0, 0.0
            for micro in range(cfg.grad_accum):
                with dist.gradient_sync(forward, cfg.parallel if stage.ddp_wrap else "none",
                                        micro == cfg.grad_accum - 1), autocast(device, step_dtype):
                    t_batch = time.perf_counter()
                    batch = stage.next_batch()  # RL: sampling a new round of rollouts, on the steps that start one
                    batch_s += time.perf_counter() - t_batch
                    tokens += stage.tokens(batch)
                    loss = stage.loss(forward, batch)
                    aux = pop_aux_loss(trained)  # a mixture of experts' balance and z-losses (model/moe.py)
                    loss = (loss if aux is None else loss + aux) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.item()
            if cfg.parallel == "ddp" and not stage.ddp_wrap:
                dist.average_gradients(model)
            loss_sum = dist.mean_across_ranks(loss_sum)  # the global batch's loss, the same on every rank
            grad_norm = torch.nn.utils.clip_grad_norm_(trained.parameters(), cfg.grad_clip)
            grad_norm = (grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm).item()
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                # skip the update, never apply a NaN; stop once it keeps happening
                optimizer.zero_grad(set_to_none=True)
                bad_steps += 1
                if log:
                    log.write({"step": step + 1, "skipped": f"non-finite loss {loss_sum} or gradient norm {grad_norm}"})
                if bad_steps > cfg.max_bad_steps:
                    raise ChatforgeError(
                        f"{stage.name}: loss or gradient non-finite in {bad_steps} steps (the last at step {step + 1},"
                        f" train.max_bad_steps={cfg.max_bad_steps}); lower train.lr or use train.precision=fp32."
                        f" The last good checkpoint is kept in {run_dir}/checkpoints")
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            # the update's speed: the global batch's tokens over the step's time less the time its batches took
            tokens_per_s = tokens * dist.rank_world()[1] / max(dt - batch_s, 1e-9)
            record = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s,
                      "mfu": flops_per_token * tokens_per_s / peak, "batch_s": batch_s, **stage.metrics(),
                      **routing_metrics(trained)}
            if record.get("router_collapsed") and step > cfg.warmup_steps and not warned_collapse and main:
                warned_collapse = True
                bar.write(f"{stage.name}: warning: the router sends {record['expert_share_max']:.0%} of the "
                              f"assignments to one expert at step {step} (collapsed; model.moe.aux_coef raises "
                              "the balance loss's weight)")
            if stage.evaluate is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
                trained.eval()
                with torch.no_grad(), autocast(device, step_dtype):
                    evaluation = stage.evaluate(trained)  # every rank: FSDP's forward needs them all
                trained.train()
                record.update(evaluation)
            if log and (step % cfg.log_every == 0 or step == cfg.steps or "val_loss" in record):
                log.write(record)
            bar.set_postfix(loss=f"{loss_sum:.3f}", tok_s=f"{tokens_per_s:,.0f}", mfu=f"{record['mfu']:.0%}",
                            refresh=False)
            bar.update(1)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps or stop_signal:
                checkpoint()
            if stop_signal:
                raise ChatforgeError(f"{stage.name}: stopped by signal at step {step}; checkpoint saved in "
                                     f"{run_dir}/checkpoints; continue with --resume")
        if fsdp:  # the trained weights, gathered from every rank's shards, into the stage's ordinary model
            model.load_state_dict(full_model_state(trained))
    finally:
        for block in dist.blocks_of(model):  # the trained model computes as before (no recomputation)
            block.__dict__.pop("forward", None)
        bar.close()
        if log:
            log.close()
        for s, h in handlers.items():
            signal.signal(s, h)
    return evaluation


def use_compile(setting: str | bool, device: torch.device) -> bool:
    """train.compile: auto compiles on CUDA (minutes to start, then faster steps); on a CPU the start-up
    rarely pays off at demo scale. true/false force it."""
    value = str(setting).lower()
    if value not in ("auto", "true", "false", "1", "0", "yes", "no", "on", "off"):
        raise ChatforgeError(f"train.compile must be auto, true or false, got '{setting}'")
    return device.type == "cuda" if value == "auto" else value in ("true", "1", "yes", "on")


def checkpoint_activations(model: torch.nn.Module) -> None:
    """Wrap each transformer block so its activations are recomputed in the backward pass instead of
    kept: memory for one block's activations instead of all of them, for about a third more compute."""
    from torch.utils.checkpoint import checkpoint

    for block in dist.blocks_of(model):
        forward = type(block).forward.__get__(block)  # the class's forward, bound to this block
        block.forward = lambda *args, _f=forward: checkpoint(_f, *args, use_reentrant=False)


def finish_run(out: Path, save: Callable[[], None], summary: dict) -> dict:
    """How every stage ends: rank 0 (under torchrun) writes the trained weights (`save`), then eval.json,
    last, so a run folder with eval.json is complete. Returns `summary`."""
    if dist.is_main():
        save()
        (Path(out) / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
