"""Checkpoints that resume exactly: model, optimizer, RNG states, data position and step.

Layout: `checkpoints/step_N/{model,optimizer,rng}.safetensors` + `state.json` (step, data position,
the files' sizes and SHA-256). Under FSDP the model and optimizer are saved sharded instead, by every
rank at once, with `torch.distributed.checkpoint` in safetensors files (`sharded/`, each shard's place in
the full tensor in its JSON header: no pickled metadata); such a checkpoint loads on any number of ranks,
and `chatforge consolidate` turns it into the single-process layout.

Written into `step_N.tmp/`, then renamed, then `latest` is replaced atomically, so a crash mid-write never
leaves a checkpoint that looks complete. Tensors go through safetensors and everything else through JSON:
nothing is unpickled.
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
from chatforge.train import distributed as dist

FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_records(folder: Path, names) -> dict:
    """Size and SHA-256 of each file, for state.json: `verify_checkpoint` checks them before loading."""
    return {name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)} for name in names}


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
                    state: dict, keep: int = 2, sharded: bool = False) -> Path | None:
    """Rank 0 writes the checkpoint (every rank writes its shards when `sharded`); the others wait."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step_{step}"
    tmp = ckpt_root / f"step_{step}.tmp"
    main = dist.is_main()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    extra = {}
    if sharded:
        groups = save_sharded(tmp / "sharded", model, optimizer)
        extra = {"format": "sharded", "world_size": dist.rank_world()[1]}
    elif main:
        save_model(model, str(tmp / "model.safetensors"))
        opt_tensors, groups = optimizer_tensors(optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    dist.barrier()  # every shard is on disk before rank 0 declares the checkpoint complete
    if not main:
        dist.barrier()
        return None
    save_file(rng_tensors(), str(tmp / "rng.safetensors"))
    names = sorted(str(f.relative_to(tmp)) for f in tmp.rglob("*.safetensors"))
    files = file_records(tmp, names)
    meta = {"step": step, "param_groups": groups, "files": files, **extra, **state}
    (tmp / "state.json").write_text(json.dumps(meta, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    latest_tmp = ckpt_root / "latest.tmp"
    latest_tmp.write_text(final.name + "\n")
    os.replace(latest_tmp, ckpt_root / "latest")
    for old in sorted(list_checkpoints(run_dir))[:-keep] if keep > 0 else []:
        shutil.rmtree(ckpt_root / f"step_{old}", ignore_errors=True)
    dist.barrier()
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
    """Restore model, optimizer and RNG from a verified checkpoint; returns its state.json. A sharded
    checkpoint loads into a model sharded over any number of ranks, or into an ordinary one."""
    meta = verify_checkpoint(path)
    if meta.get("format") == "sharded":
        load_sharded(path / "sharded", model, optimizer, meta["param_groups"])
    else:
        load_weights(model, path / "model.safetensors")
        load_optimizer_tensors(optimizer, load_file(str(path / "optimizer.safetensors")), meta["param_groups"])
    restore_rng(load_file(str(path / "rng.safetensors")))
    return meta


# --- sharded checkpoints (FSDP) -------------------------------------------------------------------------
# One flat dict of tensors: "model.<name>" for each weight and "optim.<name>.<exp_avg|exp_avg_sq|step>" for
# AdamW's state; each is a DTensor (this rank's shard) under FSDP and an ordinary tensor otherwise.


def tied_names(model: torch.nn.Module) -> dict[str, str]:
    """{second name: first name} of each parameter reachable under two names (tied embeddings)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return aliases


def _flat_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, list]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tied = tied_names(model)  # a tied weight (embedding = output layer) is saved once: safetensors refuses aliases
    flat = {f"model.{k}": v for k, v in get_model_state_dict(model).items() if k not in tied}
    osd = get_optimizer_state_dict(model, optimizer)
    for name, state in osd["state"].items():
        for key, value in state.items():
            flat[f"optim.{name}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return flat, osd["param_groups"]


def save_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list:
    """Every rank writes its shards (torch.distributed.checkpoint, safetensors); returns the param groups."""
    import torch.distributed.checkpoint as dcp

    flat, groups = _flat_state(model, optimizer)
    dcp.save(flat, storage_writer=dcp.HuggingFaceStorageWriter(str(folder), save_distributed=True))
    return groups


def load_sharded(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, groups: list) -> None:
    """Fill the model's and optimizer's tensors from a sharded checkpoint, whatever the number of ranks it
    was written by: torch.distributed.checkpoint reads, for each local tensor, the parts of the saved
    shards that overlap it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    reader = dcp.HuggingFaceStorageReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    weights = get_model_state_dict(model)
    aliases = tied_names(model)  # tied: loaded once, then given to both names
    template = {f"model.{k}": v for k, v in weights.items() if k not in aliases}
    for key, info in saved.items():
        if key.startswith("optim."):
            name = key[len("optim."):].rsplit(".", 1)[0]
            like = weights.get(name)
            same = like is not None and tuple(like.shape) == tuple(info.size)
            template[key] = torch.zeros_like(like) if same else torch.zeros(info.size, dtype=info.properties.dtype)
    missing = sorted(k for k in template if k not in saved)
    if missing:
        raise ChatforgeError(f"{folder}: the checkpoint lacks {', '.join(missing[:5])}; was it written by another "
                             "model config?")
    dcp.load(template, storage_reader=reader)
    loaded = {k[len("model."):]: v for k, v in template.items() if k.startswith("model.")}
    set_model_state_dict(model, loaded | {alias: loaded[name] for alias, name in aliases.items()})
    state: dict[str, dict] = {}
    for key, value in template.items():
        if key.startswith("optim."):
            name, slot = key[len("optim."):].rsplit(".", 1)
            state.setdefault(name, {})[slot] = value
    set_optimizer_state_dict(model, optimizer, {"state": state, "param_groups": groups})


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight whole (all-gathered from the ranks' shards under FSDP), on the CPU."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))


def consolidate(checkpoint: str | Path, out: str | Path) -> Path:
    """A sharded checkpoint as one single-process checkpoint (model.safetensors, optimizer.safetensors,
    rng.safetensors, state.json), resumable with `--resume-from OUT` without torchrun."""
    import torch.distributed.checkpoint as dcp

    checkpoint, out = Path(checkpoint), Path(out)
    meta = verify_checkpoint(checkpoint)
    if meta.get("format") != "sharded":
        raise ChatforgeError(f"{checkpoint}: already a single-process checkpoint; nothing to consolidate")
    reader = dcp.HuggingFaceStorageReader(str(checkpoint / "sharded"))
    saved = reader.read_metadata().state_dict_metadata
    full = {k: torch.zeros(info.size, dtype=info.properties.dtype) for k, info in saved.items()}
    dcp.load(full, storage_reader=reader, no_dist=True)
    index = {name: i for i, name in enumerate(n for g in meta["param_groups"] for n in g["params"])}
    groups = [{**g, "params": [index[n] for n in g["params"]]} for g in meta["param_groups"]]
    weights = {k[len("model."):]: v.contiguous() for k, v in full.items() if k.startswith("model.")}
    optim = {}
    for key, value in full.items():
        if key.startswith("optim."):
            name, slot = key[len("optim."):].rsplit(".", 1)
            optim[f"{index[name]}.{slot}"] = value.contiguous()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"))
    save_file(optim, str(tmp / "optimizer.safetensors"))
    shutil.copy(checkpoint / "rng.safetensors", tmp / "rng.safetensors")
    files = file_records(tmp, FILES)
    state = {k: v for k, v in meta.items() if k not in ("format", "files", "param_groups", "world_size")}
    (tmp / "state.json").write_text(json.dumps({**state, "param_groups": groups, "files": files}, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
