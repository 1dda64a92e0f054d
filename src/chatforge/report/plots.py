"""The report's PNG plots, drawn with matplotlib's object API (no pyplot: no global state, no GUI backend).

Each function draws one figure from the loaded run (see report.load) into `out_dir` and returns its file
name, or None when the run has nothing to draw for it, so a half-finished run still gets the plots it can.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: a server or CI has no display

from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import PercentFormatter  # noqa: E402

from chatforge.report.load import ENERGY_STAGES, MODELS, series  # noqa: E402

DPI = 100
COLORS = {"pretrain": "#1f77b4", "copy": "#bcbd22", "sft": "#ff7f0e", "rm": "#2ca02c", "ppo": "#d62728",
          "dpo": "#9467bd", "grpo": "#8c564b", "classify": "#e377c2", "base": "#7f7f7f"}


def _save(fig: Figure, out_dir: Path, name: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / name, dpi=DPI)
    return name


def _grid(n: int) -> tuple[Figure, list]:
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 2.6 * rows + 0.4))
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def plot_per_stage(info: dict, out_dir: Path, key: str, name: str, title: str, ylabel: str,
                   log: bool = False) -> str | None:
    """One small panel per stage of `key` over steps (loss, lr); held-out loss as dots where it was logged."""
    stages = [s for s, rows in info["metrics"].items() if series(rows, key)[0]]
    if not stages:
        return None
    fig, axes = _grid(len(stages))
    for ax, stage in zip(axes, stages, strict=True):
        rows = info["metrics"][stage]
        ax.plot(*series(rows, key), color=COLORS.get(stage), lw=1.2, label="train")
        if key == "loss" and series(rows, "val_loss")[0]:
            ax.plot(*series(rows, "val_loss"), "o", color="black", ms=4, label="held-out")
            ax.legend(fontsize=7)
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        else:  # a constant learning rate must not show as 0.000104 / 0.000102 / ... around an offset
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return _save(fig, out_dir, name)


def plot_bpb(info: dict, out_dir: Path) -> str | None:
    """Pre-training's held-out bits per byte over steps against the unigram baseline of the same split."""
    steps, bpb = series(info["metrics"].get("pretrain", []), "val_bpb")
    final = info["stage_eval"].get("pretrain", {}).get("val_bpb", info["results"].get("val_bpb"))
    if not steps and isinstance(final, int | float) and info["metrics"].get("pretrain"):
        steps, bpb = [info["metrics"]["pretrain"][-1]["step"]], [final]
    if not steps:
        return None
    uni = (info["stage_eval"].get("pretrain", {}).get("val_unigram_bpb") or info["results"].get("unigram_bpb")
           or info["data_meta"].get("val_unigram_bpb"))
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    ax.plot(steps, bpb, "o-", color=COLORS["pretrain"], label="model (val documents)")
    if isinstance(uni, int | float):
        ax.axhline(uni, ls="--", color="gray", label=f"unigram baseline {uni:.3f}")
    ax.set_title("Pre-training: held-out bits per byte")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte (lower is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out_dir, "pretrain_bpb.png")


def plot_rl(info: dict, out_dir: Path) -> str | None:
    """PPO and GRPO side by side: reward, KL to the reference, entropy, as far as each logged them."""
    stages = [s for s in ("ppo", "grpo") if s in info["metrics"]]
    keys = [k for k in ("reward", "kl", "entropy") if any(series(info["metrics"][s], k)[0] for s in stages)]
    if not keys:
        return None
    labels = {"reward": "mean reward of sampled replies", "kl": "KL to reference (nats/reply)",
              "entropy": "entropy (nats/token)"}
    fig = Figure(figsize=(3.6 * len(keys), 3.2))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys, strict=True):
        for stage in stages:
            steps, values = series(info["metrics"][stage], key)
            if steps:
                ax.plot(steps, values, color=COLORS[stage], label=stage)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(labels[key], fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("RL: PPO (reward model score) and GRPO (reward function)")
    return _save(fig, out_dir, "rl.png")


def plot_expert_usage(info: dict, out_dir: Path, name: str = "experts.png") -> str | None:
    """A mixture of experts' routing over training, one panel per stage that has one: each expert's share
    of the router's assignments (averaged over the sparse blocks), and the uniform share 1/E dashed."""
    stages = {s: [r for r in rows if r.get("expert_share")] for s, rows in info["metrics"].items()}
    stages = {s: rows for s, rows in stages.items() if rows}
    if not stages:
        return None
    fig, axes = _grid(len(stages))
    for ax, (stage, rows) in zip(axes, stages.items(), strict=True):
        steps, n = [r["step"] for r in rows], len(rows[0]["expert_share"])
        for j in range(n):
            ax.plot(steps, [r["expert_share"][j] for r in rows], lw=1.0, label=f"expert {j}")
        ax.axhline(1 / n, ls="--", color="gray", lw=0.8)
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("share of assignments")
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(alpha=0.3)
        if n <= 8:
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle("Expert usage (dashed: balanced)")
    return _save(fig, out_dir, name)


def plot_accuracy(info: dict, out_dir: Path) -> str | None:
    """Held-out accuracy over steps: reward model and classifier, and DPO's implicit-reward accuracy."""
    lines = [("rm", "val_accuracy", "reward model: pairwise accuracy"),
             ("dpo", "val_reward_accuracy", "DPO: implicit-reward accuracy"),
             ("classify", "val_accuracy", "classifier: accuracy")]
    drawn = [(s, k, lab) for s, k, lab in lines if series(info["metrics"].get(s, []), k)[0]]
    if not drawn:
        return None
    fig = Figure(figsize=(6, 3.6))
    ax = fig.subplots()
    for stage, key, label in drawn:
        ax.plot(*series(info["metrics"][stage], key), "o-", color=COLORS[stage], label=label)
    if any(s in ("rm", "dpo") for s, _, _ in drawn):
        ax.axhline(0.5, ls="--", color="gray", label="chance for pairs (50%)")
    ax.set_ylim(0, 1.02)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title("Held-out accuracy over training")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (held-out)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out_dir, "accuracy.png")


def plot_energy(info: dict, out_dir: Path) -> str | None:
    """Energy per stage in Wh, from each stage's energy.json."""
    stages = [s for s in ENERGY_STAGES if isinstance(info["energy"].get(s, {}).get("kwh"), int | float)]
    if not stages:
        return None
    wh = [info["energy"][s]["kwh"] * 1000 for s in stages]
    names = ["prepare" if s == "data" else s for s in stages]
    fig = Figure(figsize=(max(4.5, 0.75 * len(stages) + 1.5), 3.4))
    ax = fig.subplots()
    bars = ax.bar(names, wh, color=[COLORS.get(s, "#17becf") for s in stages])
    ax.bar_label(bars, labels=[f"{w:.3g}" for w in wh], fontsize=7)
    ax.set_title(f"Energy per stage (total {sum(wh):.3g} Wh)")
    ax.set_xlabel("stage")
    ax.set_ylabel("energy (Wh)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_dir, "energy.png")


def plot_success(models: dict[str, dict], out_dir: Path) -> str | None:
    """Held-out task success of each model that has the number."""
    names = [m for m in MODELS if isinstance(models.get(m, {}).get("success"), int | float)]
    if not names:
        return None
    values = [models[m]["success"] for m in names]
    fig = Figure(figsize=(max(4.0, 0.9 * len(names) + 1.5), 3.4))
    ax = fig.subplots()
    bars = ax.bar(names, values, color=[COLORS.get(m, "#17becf") for m in names])
    ax.bar_label(bars, labels=[f"{100 * v:.1f}%" for v in values], fontsize=8)
    ax.set_ylim(0, max(0.05, max(values) * 1.25))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_title("Held-out task success per model")
    ax.set_xlabel("model")
    ax.set_ylabel("constraint success (held-out)")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, out_dir, "success.png")


def plot_overoptimisation(form: dict, out_dir: Path) -> str | None:
    """Gao et al. (2022), Fig. 1: the gold (judge) and proxy (reward-model) scores against √KL to the SFT
    model, for PPO's rounds (their samples) and for best-of-n sampling of the SFT model against the reward
    model. Over-optimisation shows as the proxy climbing while the gold score stalls or falls. Rounds marked
    "iteration": 2 were scored by the refreshed reward model of iterated RLHF (demo_form.py)."""
    rounds = [r for r in form.get("ppo", {}).get("rounds", []) if "gold" in r]
    bon = form.get("best_of_n", [])
    if not rounds and not bon:
        return None
    fig = Figure(figsize=(6.4, 4.2))
    gold_ax = fig.subplots()
    proxy_ax = gold_ax.twinx()
    x = [math.sqrt(max(r["kl"], 0.0)) for r in rounds]
    gold_ax.plot(x, [r["gold"] for r in rounds], "o-", color="tab:green", ms=3, label="PPO: gold (judge)")
    # iterated RLHF: each iteration's proxy is its own reward model's score, so each is its own line
    for it, marker in ((1, "o--"), (2, "^--")):
        part = [(xi, r["reward"]) for xi, r in zip(x, rounds, strict=True) if r.get("iteration", 1) == it]
        if part:
            label = "PPO: proxy (reward model)" if it == 1 else "PPO iteration 2: proxy (refreshed reward model)"
            proxy_ax.plot(*zip(*part, strict=True), marker, color="tab:blue" if it == 1 else "tab:purple", ms=3,
                          label=label)
    xb = [math.sqrt(b["kl"]) for b in bon]
    gold_ax.plot(xb, [b["gold"] for b in bon], "s-", color="tab:olive", ms=3, label="best-of-n: gold")
    proxy_ax.plot(xb, [b["proxy"] for b in bon], "s--", color="tab:cyan", ms=3, label="best-of-n: proxy")
    gold_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    gold_ax.set_xlabel("√KL to the SFT model (nats^½)")
    gold_ax.set_ylabel("gold success of the samples")
    proxy_ax.set_ylabel("reward-model score")
    gold_ax.set_title("Reward model (proxy) vs judge (gold) as the policy moves away from SFT", fontsize=9)
    fig.legend(loc="upper left", bbox_to_anchor=(0.1, 0.88), fontsize=7)
    gold_ax.grid(alpha=0.3)
    return _save(fig, out_dir, "overoptimisation.png")


def draw_all(info: dict, models: dict[str, dict], out_dir: Path) -> dict[str, str]:
    """Every plot the run has data for: {plot id: file name}, in report order."""
    plots = {"loss": plot_per_stage(info, out_dir, "loss", "loss.png", "Training loss per stage", "loss"),
             "pretrain_bpb": plot_bpb(info, out_dir),
             "lr": plot_per_stage(info, out_dir, "lr", "lr.png", "Learning-rate schedule per stage", "learning rate"),
             "rl": plot_rl(info, out_dir), "accuracy": plot_accuracy(info, out_dir),
             "experts": plot_expert_usage(info, out_dir),
             "success": plot_success(models, out_dir),
             "overoptimisation": plot_overoptimisation(info.get("form", {}), out_dir),
             "energy": plot_energy(info, out_dir)}
    return {k: v for k, v in plots.items() if v}
