"""Configs as dataclasses, read from TOML, changed with dotted overrides (`train.lr=3e-4`).

A run folder keeps the resolved config as `config.toml`, so everything that shaped a run is written down.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError
from chatforge.model.lora import LoRAConfig
from chatforge.model.transformer import ModelConfig


@dataclass
class DataConfig:
    dir: str = "runs/demo/data"  # folder written by `chatforge prepare`


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    precision: str = "auto"  # auto | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: str = "auto"  # auto (on CUDA) | true | false: torch.compile the training step
    seed: int = 1337
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 20
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    max_bad_steps: int = 3  # steps with a non-finite loss or gradient skipped before the run stops
    parallel: str = "none"  # none | ddp | fsdp (under torchrun; batch_size is then the global micro-batch)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory


@dataclass
class ClassifyConfig:
    """A classification head (`chatforge classify`): which of the body's weights train with it."""

    freeze: str = "none"  # head (train only the head) | last_n (head + last n_train_layers) | none
    n_train_layers: int = 1


@dataclass
class RewardConfig:
    """The reward model's Bradley-Terry loss (`chatforge rm`)."""

    margin: float = 0.0  # m in −log σ(r_chosen − r_rejected − m): how far apart a pair must score


@dataclass
class DPOConfig:
    beta: float = 0.1  # strength of the pull towards the reference model
    loss: str = "sigmoid"  # sigmoid (DPO) | ipo | cdpo (label-smoothed, "conservative" DPO)
    label_smoothing: float = 0.0  # cdpo: the assumed share of flipped preference labels
    nll_coef: float = 0.0  # > 0: add this × the chosen reply's per-token NLL (RPO, Pang et al., 2024)


@dataclass
class RLConfig:
    """PPO and GRPO: how rollouts are sampled and scored, and how each one is learned from."""

    prompts_per_rollout: int = 32  # prompts sampled for one round of rollouts
    group_size: int = 1  # replies per prompt (GRPO: the group G, e.g. 8; PPO: 1)
    epochs: int = 2  # passes over each round's rollouts; minibatch size is train.batch_size replies
    max_new_tokens: int = 40
    temperature: float = 1.0
    top_p: float = 1.0
    reward: str = ""  # module:function(prompt, response, **row) -> float; empty: the --reward model
    gold: str = ""  # module:function logged as "gold" each round, never optimised: over-optimisation shows
    #                 as the reward rising while the gold score falls (Gao et al., 2022)
    kl_coef: float = 0.05  # β of the KL penalty to the reference (the starting model)
    kl_target: float = 0.0  # > 0: adapt β so the KL stays near this (Ziegler et al., 2019); 0: fixed β
    kl_horizon: int = 10000  # adaptive β's time constant, in replies
    kl_per_score_std: bool = False  # β in units of the first round's score spread: β σ (AdaptiveKL.scale)
    no_end_penalty: float = 1.0  # subtracted from the score of a reply that never emits <|im_end|>
    gamma: float = 1.0  # PPO: discount
    lam: float = 0.95  # PPO: GAE λ
    clip: float = 0.2  # ε of the clipped policy objective
    value_clip: float = 0.2  # PPO: how far the value may move from its rollout value per round; 0: unclipped
    value_coef: float = 0.1  # PPO: weight of the value loss
    ptx_coef: float = 0.0  # PPO-ptx: weight of the pre-training loss on data.dir's shards (0 = off)
    whiten_rewards: bool = False  # PPO: normalise scores within each round before the KL penalty


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    rl: RLConfig = field(default_factory=RLConfig)


# Keys that may differ between a run and its resumption without changing what is computed.
RESUME_SAFE_KEYS = {"train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
                    "train.compile", "train.steps", "train.parallel",  # ranks change speed, not the numbers
                    "train.max_bad_steps"}


def _set(obj: Any, dotted: str, value: Any, where: str) -> None:
    *parents, leaf = dotted.split(".")
    for name in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, name):
            raise ChatforgeError(f"{where}: unknown config section '{name}' in '{dotted}'")
        obj = getattr(obj, name)
    names = [f.name for f in dataclasses.fields(obj)]
    if leaf not in names:
        raise ChatforgeError(f"{where}: unknown config key '{dotted}'. Valid keys here: {', '.join(names)}")
    current = getattr(obj, leaf)
    if isinstance(current, bool) and isinstance(value, str):
        value = value.lower() in ("1", "true", "yes", "on")
    elif current is not None and not isinstance(value, type(current)):
        try:
            value = type(current)(value)
        except (TypeError, ValueError) as e:
            raise ChatforgeError(f"{where}: '{dotted}' wants a {type(current).__name__}, got {value!r}") from e
    setattr(obj, leaf, value)


def _flatten(table: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, base: Config | None = None
) -> Config:
    """Defaults (or `base`), then the TOML file, then `key=value` overrides, in that order."""
    cfg = base or Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ChatforgeError(f"{path}: config file not found")
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ChatforgeError(f"{path}: not valid TOML ({e})") from e
        for key, value in _flatten(table).items():
            _set(cfg, key, value, str(path))
    for item in overrides or []:
        if "=" not in item:
            raise ChatforgeError(f"override '{item}' must look like section.key=value, e.g. train.lr=1e-3")
        key, value = item.split("=", 1)
        _set(cfg, key.strip(), _parse_value(value.strip()), "command line")
    return cfg


def config_to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v), ensure_ascii=False)


def dump_toml(table: dict, prefix: str = "") -> str:
    """Write a dict of sections (of scalars, and of sub-sections such as model.moe) as TOML; None values
    are left out."""
    lines = []
    for section, values in table.items():
        lines.append(f"[{prefix}{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None and not isinstance(v, dict)]
        lines.append("")
        subsections = {k: v for k, v in values.items() if isinstance(v, dict)}
        if subsections:
            lines.append(dump_toml(subsections, f"{prefix}{section}."))
    return "\n".join(lines)


def config_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two configs, ignoring the resume-safe ones."""
    # a key the saved config lacks (a run from before the key existed) had its default value
    a, b, default = _flatten(saved), _flatten(current), _flatten(config_to_dict(Config()))
    return sorted(k for k in set(a) | set(b) if a.get(k, default.get(k)) != b.get(k) and k not in RESUME_SAFE_KEYS)
