"""Checkpoints that resume exactly: model, optimizer, RNG states, data position and step.

Layout: `checkpoints/step_N/{model,optimizer,rng}.safetensors` + `state.json` (step, data position,
the files' sizes and SHA-256). Written into `step_N.tmp/`, then renamed, then `latest` is replaced
atomically, so a crash mid-write never leaves a checkpoint that looks complete. Tensors go through
safetensors and everything else through JSON: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file, save_model

from chatforge.errors import ChatforgeError
from chatforge.model.io import load_weights

FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Flatten an optimizer's state into named tensors plus its JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, sd["param_groups"]


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = t
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"torch_cuda_{i}"] = s
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f"step_{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    opt_tensors, groups = optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(rng_tensors(), str(tmp / "rng.safetensors"))
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)} for name in FILES}
    meta = {"step": step, "param_groups": groups, "files": files, **state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = ckpt_root / "latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    for old in sorted(list_checkpoints(run_dir))[:-keep] if keep > 0 else []:
        shutil.rmtree(ckpt_root / f"step_{old}", ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | Path) -> list[int]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in root.glob("step_*") if p.is_dir() and p.name[5:].isdigit())


def resolve_checkpoint(run_dir: str | Path, which: str = "latest") -> Path:
    """`latest`, a step number, or a path to a checkpoint folder."""
    root = Path(run_dir) / "checkpoints"
    if which == "latest":
        # The newest step_N folder, not only what the `latest` file says: a step_N folder appears only by
        # rename once complete, so a crash between that rename and the `latest` update loses nothing.
        steps = sorted((int(d.name[5:]), d) for d in root.glob("step_*") if d.is_dir() and d.name[5:].isdigit())
        if not steps:
            raise ChatforgeError(f"{root}: no checkpoint to resume from; start without --resume")
        return steps[-1][1]
    if which.isdigit():
        return root / f"step_{which}"
    return Path(which)


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the size and SHA-256 recorded when it was written."""
    state_path = path / "state.json"
    if not state_path.is_file():
        raise ChatforgeError(f"{path}: not a complete checkpoint (no state.json)")
    try:
        meta = json.loads(state_path.read_text())
    except json.JSONDecodeError as e:
        raise ChatforgeError(f"{state_path}: corrupt ({e.msg})") from None
    for name, want in meta["files"].items():
        f = path / name
        bad = not f.is_file() or f.stat().st_size != want["bytes"] or _sha256(f) != want["sha256"]
        if bad:
            others = [s for s in list_checkpoints(path.parent.parent) if f"step_{s}" != path.name]
            hint = f"resume from an earlier one with --resume-from {others[-1]}" if others else "start the run again"
            raise ChatforgeError(f"{f}: truncated or corrupted checkpoint (size or SHA-256 differs); {hint}")
    return meta


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Restore model, optimizer and RNG from a verified checkpoint; returns its state.json."""
    meta = verify_checkpoint(path)
    load_weights(model, path / "model.safetensors")
    load_optimizer_tensors(optimizer, load_file(str(path / "optimizer.safetensors")), meta["param_groups"])
    restore_rng(load_file(str(path / "rng.safetensors")))
    return meta
