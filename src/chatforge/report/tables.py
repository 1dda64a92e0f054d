"""The report's tables as plain rows of strings, plus the README's results table and its in-place update.

Rows are built once and rendered twice (HTML and Markdown) so the two files can never disagree. Cells may
hold the README's light Markdown (`**bold**`, `` `code` ``); the HTML renderer escapes first, then converts.
"""

from __future__ import annotations

import html
import re
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.layout import MODEL_FOLDERS
from chatforge.report.load import ENERGY_STAGES, MODELS, load_run
from chatforge.report.summary import DASH, num, pct, seconds, stage_rows

START, END = "<!-- results:start -->", "<!-- results:end -->"
HEADERS = {"en": ["stage", "what is measured (held-out)", "result", "baseline", "time"],
           "zh": ["阶段", "测量内容(留出数据)", "结果", "基线", "用时"]}
# eval.json's per-model metrics: (key, column header, how to format). Unknown numeric keys are added after these.
MODEL_COLUMNS = [("bpb", "val bits/byte", lambda x: num(x, 3)), ("success", "task success", pct),
                 ("end_rate", "ends with `<|im_end|>`", pct), ("choice_accuracy", "multiple choice", pct),
                 ("choice_accuracy_norm", "multiple choice (length-normalised)", pct),
                 ("toxicity", "mean toxicity", lambda x: num(x, 3)), ("toxic_rate", "toxic replies", pct),
                 ("refusal_rate", "refusals (harmful prompts)", pct),
                 ("over_refusal_rate", "over-refusals (harmless prompts)", pct),
                 ("rm_score", "reward-model score", lambda x: num(x, 2)),
                 ("rm_win_rate", "reward-model win rate vs SFT", pct),
                 ("rm_auc", "reward model tells the model's successes from its failures (AUC)", pct)]
HIDDEN_MODEL_KEYS = {"n", "task_prompts", "samples", "scores", "success_en", "success_zh"}
ENERGY_LABELS = {"data": "prepare"}


def md_cell(text: str) -> str:
    """A Markdown table cell: pipes escaped, line breaks as <br>."""
    return text.replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>")


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub Markdown table, with empty cells written `| |` as the README does."""
    def line(cells: list[str]) -> str:
        return "|" + "|".join(f" {md_cell(c)} " if c else " " for c in cells) + "|"
    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, rows)]) + "\n"


def md_inline_html(text: str) -> str:
    """The README's light Markdown (**bold**, `code`) as HTML, after escaping everything else."""
    out = html.escape(text)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", out)


def md_escape_text(text: str) -> str:
    """Untrusted text (a model's reply) made inert in Markdown: HTML-escaped, pipes and backticks escaped."""
    return html.escape(text).replace("|", "\\|").replace("`", "\\`").replace("*", "\\*")


def summary_table(info: dict, lang: str = "en", missing: bool = True) -> tuple[list[str], list[list[str]]]:
    """Headers and rows of the per-stage summary; the report adds the held-out split column."""
    headers = HEADERS[lang][:2] + (["held-out split"] if missing else []) + HEADERS[lang][2:]
    rows = []
    for r in stage_rows(info, lang, missing):
        if r.get("missing"):
            rows.append([r["label"], f"not run yet — `{r['command']}`"] + [""] * (len(headers) - 2))
        else:
            rows.append([r["label"], r["what"]] + ([r["split"]] if missing else []) +
                        [r["result"], r["baseline"], r["time"]])
    return headers, rows


def results_table(run_dir: str | Path, lang: str = "en") -> str:
    """The README's "Results" table (stage | what is measured | result | baseline | time) for a run folder.

    Only stages the run has appear; rows that come from benchmarks rather than a run (export, decode, serve,
    training step MFU) are not produced here. `lang` is "en" (README.md) or "zh" (README.zh-CN.md).
    """
    if lang not in HEADERS:
        raise ChatforgeError(f"results table language {lang!r}: use 'en' or 'zh'")
    headers, rows = summary_table(load_run(run_dir), lang, missing=False)
    return md_table(headers, rows)


def update_readme(path: str | Path, table: str) -> bool:
    """Put `table` between the `<!-- results:start -->` / `<!-- results:end -->` lines; True if the file changed.

    Markers rather than guessing where a table starts keep the prose around it (which a person writes) safe.
    """
    path = Path(path)
    if not path.is_file():
        raise ChatforgeError(f"{path}: no such README file")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == START]
    ends = [i for i, line in enumerate(lines) if line.strip() == END]
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ChatforgeError(f"{path}: needs exactly one line `{START}` followed later by one line `{END}` around "
                             f"the results table (found {len(starts)} start and {len(ends)} end markers); add them")
    body = table if table.endswith("\n") or not table else table + "\n"
    new = "".join(lines[: starts[0] + 1]) + body + "".join(lines[ends[0]:])
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def model_table(info: dict, models: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Rows = models (base, SFT, PPO, DPO, GRPO), columns = every eval metric any model has."""
    known = [c for c in MODEL_COLUMNS if any(c[0] in m for m in models.values())]
    extra = sorted({k for m in models.values() for k, v in m.items()
                    if isinstance(v, int | float) and k not in HIDDEN_MODEL_KEYS} - {c[0] for c in MODEL_COLUMNS})
    columns = known + [(k, k.replace("_", " "), lambda x: num(x, 3)) for k in extra]
    rows = []
    for name in MODELS:
        m = models.get(name, {})
        if not m and name in ("ppo", "dpo", "grpo") and info.get("form"):
            continue  # the demo's aligned models live in form/, reported in the alignment section
        if not m and MODEL_FOLDERS[name] not in info["stages"]:
            rows.append([name, f"not run yet (no {MODEL_FOLDERS[name]}/ folder)"] + [""] * (len(columns) - 1))
            continue
        cells = [fmt(m[key]) if isinstance(m.get(key), int | float) else DASH for key, _, fmt in columns]
        rows.append([name] + cells)
    return ["model"] + [c[1] for c in columns], rows


def _sig(x: float) -> str:
    return f"{x:.3g}" if x else "0"


def energy_table(info: dict) -> tuple[list[str], list[list[str]], dict]:
    """Rows per stage (seconds, device, W, source, kWh, gCO2), a totals row, and the assumptions used."""
    headers = ["stage", "seconds", "device", "W", "power source", "kWh", "g CO2"]
    rows, kwh, co2, secs = [], 0.0, 0.0, 0.0
    assumptions: dict[str, dict[str, list[str]]] = {"grid_g_per_kwh": {}, "pue": {}, "power_source": {}}
    present = set(info["stages"]) | ({"tokenizer"} if info["has_tokenizer"] else set())
    present |= {"data"} if info["data_meta"] else set()
    for stage in ENERGY_STAGES:
        label = ENERGY_LABELS.get(stage, stage)
        e = info["energy"].get(stage)
        if not e:
            if stage in present:
                rows.append([label, seconds(info["results"].get(f"{label}_seconds")) or DASH, "not measured"]
                            + [""] * 4)
            continue
        for key in assumptions:
            if key in e:
                assumptions[key].setdefault(str(e[key]), []).append(label)
        kwh += e.get("kwh", 0.0)
        co2 += e.get("co2_g", 0.0)
        secs += e.get("seconds", 0.0)
        rows.append([label, seconds(e.get("seconds")) or DASH, str(e.get("device", DASH)),
                     num(e["watts"], 0) if isinstance(e.get("watts"), int | float) else DASH,
                     str(e.get("power_source", DASH)), _sig(e["kwh"]) if "kwh" in e else DASH,
                     _sig(e["co2_g"]) if "co2_g" in e else DASH])
    totals = {"kwh": kwh, "co2_g": co2, "seconds": secs, "assumptions": assumptions,
              "stages": [ENERGY_LABELS.get(s, s) for s in ENERGY_STAGES if info["energy"].get(s)]}
    if info["energy"]:
        rows.append(["**total (measured stages)**", seconds(secs), "", "", "", f"**{_sig(kwh)}**", f"**{_sig(co2)}**"])
    return headers, rows, totals
