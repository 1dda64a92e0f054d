"""Read everything a run folder holds that the report shows, into one plain dict.

The report never trains or evaluates anything: it only reads what the stages already wrote
(`results.json`, each stage's `metrics.jsonl`, `eval.json`, `config.toml`, `energy.json`, and the top-level
`eval.json` of `chatforge eval`). Every file is optional, so a half-finished run still gets a report.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

from chatforge.data.readers import read_jsonl
from chatforge.errors import ChatforgeError
from chatforge.layout import FORM_STEPS, MODEL_FOLDERS, TASK_PROMPTS, TRAINED

# Folders whose energy.json the report sums, in pipeline order: the demo's steps, a user's RL stages, and
# the alignment part's steps under form/.
ENERGY_STAGES = ("tokenizer", "data", "pretrain", "tasks", "copy", "sft", "rm", "ppo", "dpo", "grpo",
                 *(f"form/{step}" for step in FORM_STEPS), "classify", "eval")
MODELS = tuple(MODEL_FOLDERS)


def read_json(path: Path) -> dict:
    """A JSON object from a file, or {} when the file is absent; a broken file names itself."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChatforgeError(f"{path}: not valid JSON ({e}); re-run the stage that wrote it") from None
    if not isinstance(data, dict):
        raise ChatforgeError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_toml(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ChatforgeError(f"{path}: not valid TOML ({e})") from None


def _count_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with path.open(encoding="utf-8", errors="replace") as f:
        return sum(1 for line in f if line.strip())


def single_stage(run: Path) -> str | None:
    """The stage of a folder that is itself one stage's run (`chatforge pretrain --out runs/x`), or None."""
    if not (run / "metrics.jsonl").is_file():
        return None
    if (run / "reward.json").is_file():
        return "rm"
    if (run / "classifier.json").is_file():
        return "classify"
    stage = read_json(run / "model.json").get("stage") or read_json(run / "adapter.json") and "sft"
    return stage if stage in TRAINED else "pretrain"


def load_run(run_dir: str | Path) -> dict:
    """Everything the report needs from `run_dir`; raises ChatforgeError when there is nothing to report.

    Keys: dir, results, eval (top-level eval.json), stages (folders present), metrics {stage: [rows]},
    stage_eval {stage: eval.json}, config {stage: config.toml}, energy {folder: energy.json},
    data_meta (prepare's meta.json), counts (held-out sizes found in the tasks folder).
    """
    run = Path(run_dir)
    if not run.is_dir():
        raise ChatforgeError(f"{run}: no such run folder; give the folder `chatforge demo --out` wrote "
                             "(for example runs/demo)")
    info: dict = {"dir": run, "results": read_json(run / "results.json"), "eval": read_json(run / "eval.json"),
                  "stages": [], "metrics": {}, "stage_eval": {}, "config": {}, "energy": {}}
    single = single_stage(run)
    folders = {single: run} if single else {stage: run / stage for stage in TRAINED}
    for stage, folder in folders.items():
        if not folder.is_dir():
            continue
        info["stages"].append(stage)
        if (folder / "metrics.jsonl").is_file():
            rows = [row for _, row in read_jsonl(folder / "metrics.jsonl")]
            for i, row in enumerate(rows):
                if not isinstance(row.get("step"), int | float):
                    raise ChatforgeError(f"{folder / 'metrics.jsonl'}: row {i + 1} has no numeric \"step\"")
            info["metrics"][stage] = rows
        info["stage_eval"][stage] = read_json(folder / "eval.json")
        info["config"][stage] = _read_toml(folder / "config.toml")
    for name in ENERGY_STAGES:
        energy = read_json((run if name == single else run / name) / "energy.json")
        if energy:
            info["energy"][name] = energy
    info["form"] = read_json(run / "form" / "eval.json")  # the alignment part (demo_form.py)
    info["data_meta"] = read_json(run / "data" / "meta.json")
    info["has_tokenizer"] = (run / "tokenizer" / "tokenizer.json").is_file()
    info["counts"] = {"prefs_val": _count_lines(run / "tasks" / "prefs_val.jsonl"),
                      "prompts_heldout": _count_lines(run / "tasks" / "prompts_heldout.jsonl")}
    if not (info["results"] or info["eval"] or info["stages"] or info["energy"] or info["data_meta"]):
        raise ChatforgeError(f"{run}: nothing to report: no results.json, eval.json, data/meta.json or stage "
                             f"folders ({', '.join(TRAINED)}); run `chatforge demo --out {run}` or a stage first")
    return info


def stage_seconds(info: dict, stage: str) -> float | None:
    """Wall time of a stage: results.json's `<stage>_seconds`, else the stage's energy.json seconds."""
    key = "prepare" if stage == "data" else stage
    value = info["results"].get(f"{key}_seconds")
    if isinstance(value, int | float):
        return float(value)
    value = info["energy"].get(stage, {}).get("seconds")
    return float(value) if isinstance(value, int | float) else None


def model_metrics(info: dict, model: str) -> dict:
    """One model's held-out numbers: `chatforge eval`'s eval.json first, results.json's `<model>_*` to fill gaps."""
    out: dict = {}
    results = info["results"]
    for key in ("success", "end_rate", "rm_score", "rm_win_rate", "rm_auc", "success_en", "success_zh"):
        if isinstance(results.get(f"{model}_{key}"), int | float):
            out[key] = results[f"{model}_{key}"]
    if model == "base" and isinstance(results.get("val_bpb"), int | float):
        out["bpb"] = results["val_bpb"]
    from_eval = info["eval"].get("models", {}).get(model)
    if isinstance(from_eval, dict):
        out.update({k: v for k, v in from_eval.items() if v is not None})
    return out


def task_prompt_count(info: dict) -> int | None:
    """How many held-out task prompts the success numbers come from, or None when nothing says."""
    for model in info["eval"].get("models", {}).values():  # eval.json's success numbers win, so its count does
        for key in ("task_prompts", "n"):
            if isinstance(model, dict) and isinstance(model.get(key), int):
                return model[key]
    n = info["results"].get("eval_prompts")
    if isinstance(n, int):
        return n
    found = info["counts"]["prompts_heldout"]
    return min(found, TASK_PROMPTS) if found else None


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the metrics rows that have a numeric `key`."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]
