"""LoRA (Hu et al., 2021): freeze W, learn a low-rank update. h = W x + (alpha / r) · B A x, with
A ∈ R^{r×in} (random) and B ∈ R^{out×r} (zeros), so at initialisation the model is exactly the base.

Targets name the projections: q, k, v, o (attention) and up, down, gate (MLP). q, k and v live in
one fused `qkv` matrix here, so each gets its own adapter on its slice of that matrix's output.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from chatforge.errors import ChatforgeError
from chatforge.model.transformer import MLP, Transformer

TARGETS = ("q", "k", "v", "o", "up", "down", "gate")


@dataclass
class LoRAConfig:
    r: int = 0  # 0 = LoRA off: full fine-tuning
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = "q,v"  # comma-separated: q,k,v,o,up,down,gate

    def target_list(self) -> list[str]:
        names = [t.strip() for t in self.targets.split(",") if t.strip()]
        bad = [t for t in names if t not in TARGETS]
        if bad or not names:
            raise ChatforgeError(f"lora.targets: unknown {bad or 'empty'}; choose from {','.join(TARGETS)}")
        return names


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus low-rank adapters, each on a slice [start, end) of the output."""

    def __init__(self, base: nn.Linear, slices: dict[str, tuple[int, int]], cfg: LoRAConfig):
        super().__init__()
        self.base = base
        self.scale = cfg.alpha / cfg.r
        self.slices = slices
        self.dropout = nn.Dropout(cfg.dropout)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (start, end) in slices.items():
            a = torch.empty(cfg.r, base.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as nn.Linear initialises its weight
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(end - start, cfg.r))

    @property
    def weight(self) -> torch.Tensor:  # so code that reads .weight sees the base matrix
        return self.base.weight

    def delta(self) -> torch.Tensor:
        """The full update ΔW = scale · B A, zero outside the adapted slices."""
        d = torch.zeros_like(self.base.weight)
        for name, (start, end) in self.slices.items():
            d[start:end] = self.scale * (self.lora_B[name] @ self.lora_A[name])
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        h = self.dropout(x)
        parts = []
        for name, (start, end) in self.slices.items():
            parts.append((start, end, F.linear(F.linear(h, self.lora_A[name]), self.lora_B[name]) * self.scale))
        if len(parts) == 1 and parts[0][0] == 0 and parts[0][1] == out.shape[-1]:
            return out + parts[0][2]
        pieces, cursor = [], 0
        for start, end, update in sorted(parts, key=lambda p: p[0]):
            if start > cursor:
                pieces.append(out[..., cursor:start])
            pieces.append(out[..., start:end] + update)
            cursor = end
        if cursor < out.shape[-1]:
            pieces.append(out[..., cursor:])
        return torch.cat(pieces, dim=-1)


def apply_lora(model: Transformer, cfg: LoRAConfig) -> list[str]:
    """Freeze every base weight and wrap the targeted projections; returns the adapted module names."""
    targets = cfg.target_list()
    for p in model.parameters():
        p.requires_grad_(False)
    hd = model.cfg.d_model // model.cfg.n_head
    q_size, kv_size = model.cfg.n_head * hd, model.cfg.kv_heads * hd
    qkv_slices = {"q": (0, q_size), "k": (q_size, q_size + kv_size), "v": (q_size + kv_size, q_size + 2 * kv_size)}
    wrapped, names = [], {module: name for name, module in model.named_modules()}
    for block in model.blocks:
        plan = [(block.attn, "qkv", {t: qkv_slices[t] for t in targets if t in qkv_slices}),
                (block.attn, "proj", {"o": (0, block.attn.proj.out_features)} if "o" in targets else {})]
        # a mixture of experts adapts each expert's projections; its router stays frozen, so the adapted
        # model routes as its base does
        mlps = [block.mlp] if isinstance(block.mlp, MLP) else [*block.mlp.experts, block.mlp.shared]
        for mlp in filter(None, mlps):
            for t in ("up", "down", "gate"):
                layer = getattr(mlp, t)
                if t in targets and layer is not None:
                    plan.append((mlp, t, {t: (0, layer.out_features)}))
        for parent, attr, slices in plan:
            if slices:
                setattr(parent, attr, LoRALinear(getattr(parent, attr), slices, cfg))
                wrapped.append(f"{names[parent]}.{attr}")
    return wrapped


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if ".lora_" in k}


def save_adapter(model: nn.Module, cfg: LoRAConfig, folder: str | Path, base_run: str) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state(model), str(folder / "adapter.safetensors"))
    (folder / "adapter.json").write_text(json.dumps({"lora": asdict(cfg), "base": str(base_run)}, indent=2) + "\n")


def load_adapter(model: Transformer, folder: str | Path) -> LoRAConfig:
    folder = Path(folder)
    meta = json.loads((folder / "adapter.json").read_text())
    cfg = LoRAConfig(**meta["lora"])
    apply_lora(model, cfg)
    tensors = load_file(str(folder / "adapter.safetensors"))
    missing = set(adapter_state(model)) ^ set(tensors)
    if missing:
        raise ChatforgeError(f"{folder}/adapter.safetensors does not fit the base model ({sorted(missing)[:3]} ...)")
    model.load_state_dict(tensors, strict=False)
    return cfg


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight (W ← W + scale · B A) and unwrap it."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    child.base.weight += child.delta()
                setattr(module, attr, child.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return model
