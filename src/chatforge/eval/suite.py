"""`chatforge eval`: every held-out number of one policy run, or of every model in a demo folder.

One run (`--run runs/demo/sft`): bits per byte (`--data` shards or `--text` files), the demo task's
constraint success and end-token rate (`--prompts`), multiple-choice accuracy by log-likelihood
(`--choices`), the harms probe (`--harms`), and the reward model's win-rate of this run's replies over
another run's (`--reward RM --against RUN`).

A demo folder (`--run runs/demo`): all of that for base (pretrain), sft, ppo, dpo and grpo, whichever
exist, on the folder's own held-out splits; written to runs/demo/eval.json for the report.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from chatforge.errors import ChatforgeError
from chatforge.layout import MODEL_FOLDERS, TASK_PROMPTS

if TYPE_CHECKING:
    from chatforge.eval.task import Task

REPO = Path(__file__).resolve().parents[3]
BENCH = REPO / "data" / "bench" / "wordnet_gloss.jsonl"
SAMPLES = 6  # held-out prompts shown side by side in the report


def run_kind(folder: str | Path) -> str:
    """policy (model.json or a LoRA adapter), reward (reward.json), classifier (classifier.json) or
    runs (a folder of runs, like runs/demo)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ChatforgeError(f"{folder}: no such run folder")
    for kind, marker in (("policy", "model.json"), ("policy", "adapter.json"), ("reward", "reward.json"),
                         ("classifier", "classifier.json")):
        if (folder / marker).is_file():
            return kind
    if any((folder / sub / "model.json").is_file() for sub in MODEL_FOLDERS.values()):
        return "runs"
    raise ChatforgeError(f"{folder}: not a run folder (no model.json, reward.json or classifier.json) and no "
                         f"runs inside it ({', '.join(MODEL_FOLDERS.values())})")


def require_policy(folder: str | Path, role: str = "--run") -> None:
    kind = run_kind(folder)
    if kind == "reward":
        raise ChatforgeError(f"{role} {folder}: a reward model (reward.json), not a policy that writes text; "
                             "pass it as --reward and a policy as --run")
    if kind == "classifier":
        raise ChatforgeError(f"{role} {folder}: a classifier (classifier.json), not a policy that writes text; "
                             "try `chatforge classify --run ... --predict TEXT`")
    if kind != "policy":
        raise ChatforgeError(f"{role} {folder}: a folder of runs; name one of them")


def evaluate_policy(run: str | Path, data: str | Path | None = None, text: list[str] | None = None,
                    prompts: list[dict] | None = None, choices: list[dict] | None = None,
                    harm_prompts: list[dict] | None = None, reward_model: torch.nn.Module | None = None,
                    against_scores: torch.Tensor | None = None, task: Task | None = None) -> dict:
    """The held-out numbers of one policy run; each part runs only when its input is given. `task` judges
    the replies to `prompts` (the demo's verse task unless given)."""
    from chatforge.eval.task import evaluate_task
    from chatforge.model.io import load_run_model
    from chatforge.tasks import verse
    from chatforge.tokenizer import load_tokenizer

    require_policy(run)
    model, tok = load_run_model(run), load_tokenizer(run)
    out: dict = {}
    if data is not None:
        from chatforge.eval.bpb import bpb_on_shards

        out["bpb"] = bpb_on_shards(model, data)["bpb"]
    if text:
        from chatforge.eval.bpb import bpb_on_text

        out["text_bpb"] = bpb_on_text(model, tok, text)["bpb"]
    if prompts:
        e = evaluate_task(model, tok, prompts, task or verse.TASK, reward_model=reward_model)  # one set for both
        out.update({k: v for k, v in e.items() if k.startswith("success")}, end_rate=e["end_rate"], task_prompts=e["n"])
        out["samples"] = [s["reply"] for s in e["samples"][:SAMPLES]]
        if reward_model is not None:
            scores = e["scores"]
            out["rm_score"] = scores.mean().item()
            if e["rm_auc"] is not None:
                out["rm_auc"] = e["rm_auc"]
            out["scores"] = scores
            if against_scores is not None:
                out["rm_win_rate"] = (scores > against_scores).float().mean().item()
    if choices:
        from chatforge.eval.choice import choice_accuracy

        c = choice_accuracy(model, tok, choices)
        out.update(choice_accuracy=c["accuracy"], choice_accuracy_norm=c["accuracy_norm"],
                   choice_questions=len(choices))
    if harm_prompts:
        from chatforge.eval.harms import harms_probe

        h = harms_probe(model, tok, harm_prompts)
        out.update({k: h[k] for k in ("toxicity", "toxic_rate", "refusal_rate", "over_refusal_rate")})
    return out


def heldout_sample(path: str | Path, n: int = TASK_PROMPTS) -> list[dict]:
    """Up to `n` of the held-out task prompts, a seeded sample (so every model sees the same ones); all of
    them when there are fewer, as in the demo: a gain of a few points over 200 prompts is noise."""
    from chatforge.eval.task import load_prompts

    rows = load_prompts(path)
    return random.Random(0).sample(rows, min(n, len(rows)))


def evaluate_runs(folder: str | Path, progress=print) -> dict:
    """Every policy in a demo folder on the folder's held-out splits; writes folder/eval.json, and its
    time and energy to folder/eval/energy.json."""
    from chatforge.eval.energy import measure

    (Path(folder) / "eval").mkdir(parents=True, exist_ok=True)
    with measure("eval", Path(folder) / "eval"):
        return _evaluate_runs(Path(folder), progress)


def _evaluate_runs(folder: Path, progress) -> dict:
    from chatforge.eval.choice import load_choices
    from chatforge.eval.harms import load_harm_prompts
    from chatforge.stages.reward import load_reward_model

    names = [n for n, sub in MODEL_FOLDERS.items() if (folder / sub / "model.json").is_file()]
    data = folder / "data" if (folder / "data" / "meta.json").is_file() else None
    prompt_file = folder / "tasks" / "prompts_heldout.jsonl"
    prompts = heldout_sample(prompt_file) if prompt_file.is_file() else None
    choices, harm_prompts = load_choices(BENCH), load_harm_prompts()
    reward_model = load_reward_model(folder / "rm") if (folder / "rm" / "reward.json").is_file() else None
    models: dict[str, dict] = {}
    against = None
    for name in sorted(names, key=lambda n: n != "sft"):  # SFT first: the others' win-rate is against it
        progress(f"   eval {name}: {folder / MODEL_FOLDERS[name]}")
        models[name] = evaluate_policy(folder / MODEL_FOLDERS[name], data, None, prompts, choices, harm_prompts,
                                       reward_model, against)
        if name == "sft":
            against = models[name].get("scores")
    samples = []
    if prompts:
        for i, row in enumerate(prompts[:SAMPLES]):
            samples.append({"prompt": row["prompt"],
                            "replies": {n: models[n]["samples"][i] for n in names if len(models[n]["samples"]) > i}})
    for m in models.values():
        m.pop("scores", None)
        m.pop("samples", None)
    from chatforge.eval.harms import __doc__ as harms_doc

    report = {
        "models": {n: models[n] for n in names},
        "splits": {
            "bpb": f"the first 32,768 tokens of the val split of {data} (val documents, never trained on)" if data
            else "no prepared data in this folder",
            "task": f"{len(prompts)} prompts from {prompt_file}: keywords never seen in training" if prompts
            else "no task prompts in this folder",
            "choice": f"{BENCH.relative_to(REPO)}: {len(choices)} WordNet gloss questions, never trained on",
            "harms": f"{len(harm_prompts)} prompts of data/harms/prompts.jsonl, never trained on",
            "rm": "the reward model's score of each greedy reply to the task prompts; win-rate: share of prompts "
                  "where it scores the model's reply above the SFT model's",
        },
        "chance": {"choice": sum(1 / len(c["choices"]) for c in choices) / len(choices)},
        "harms": {"prompts": len(harm_prompts), "about": (harms_doc or "").strip()},
        "samples": samples,
    }
    (folder / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
