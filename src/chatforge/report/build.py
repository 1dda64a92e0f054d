"""`chatforge report`: one self-contained HTML page (and the same as Markdown) for a run folder.

The report is built as a list of blocks (heading, paragraph, table, image, samples) and rendered twice, so
report.html and report.md say the same thing. The HTML embeds its PNGs as data: URLs and carries its CSS
inline, so it can be mailed or opened offline; a Content-Security-Policy forbids any fetch or script, and
every model reply is HTML-escaped, so a reply that contains markup shows as text.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from chatforge.report.load import MODELS, load_run, model_metrics
from chatforge.report.plots import draw_all
from chatforge.report.summary import seconds
from chatforge.report.tables import energy_table, md_escape_text, md_inline_html, md_table, model_table, summary_table

PLOT_FILES = ("loss.png", "pretrain_bpb.png", "lr.png", "rl.png", "accuracy.png", "success.png", "overoptimisation.png",
              "energy.png")
MAX_SAMPLES = 24
CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI","Noto Sans","Noto Sans CJK SC","PingFang SC","Microsoft YaHei",
 sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .55em;
 vertical-align:top;text-align:left}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}
code{background:#f0f0f0;padding:0 .2em;border-radius:3px;font-size:.92em}
.note{color:#555;font-size:.88em;margin-top:-.3em}img{max-width:100%;height:auto;display:block;margin:.6em 0}
.sample{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em}.prompt{font-weight:600;margin-bottom:.4em}
.replies{display:grid;grid-template-columns:repeat(auto-fit,minmax(190px,1fr));gap:.5em}
.reply{background:#f7f7f7;border-radius:4px;padding:.4em}.who{font-size:.8em;color:#666;text-transform:uppercase}
.text{white-space:pre-wrap;word-break:break-word}
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _summary_blocks(info: dict) -> list[tuple]:
    headers, rows = summary_table(info, "en", missing=True)
    total = info["results"].get("total_seconds")
    blocks: list[tuple] = [("h2", "Summary: every stage"), ("table", headers, rows)]
    if isinstance(total, int | float):
        blocks.append(("p", f"Total wall time of `chatforge demo`: {seconds(total)}."))
    blocks.append(("note", "Which split: the \"held-out split\" column says where each number comes from; none of "
                           "them is measured on data the stage trained on, except the PPO reward curve, which is "
                           "scored on each round's fresh training prompts."))
    return blocks


def _model_blocks(info: dict, models: dict[str, dict], plots: dict[str, str]) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Models compared")]
    if not models:
        return blocks + [("p", f"Not measured yet — `chatforge eval --run {info['dir']}` scores every model.")]
    headers, rows = model_table(info, models)
    blocks.append(("table", headers, rows))
    if "success" in plots:
        blocks.append(("img", plots["success"], "Held-out task success per model"))
    ev = info["eval"]
    splits = ev.get("splits") if isinstance(ev.get("splits"), dict) else {}
    if splits:
        note = "Which split: " + "; ".join(f"{k}: {v}" for k, v in splits.items()) + "."
    else:
        note = ("Which split: task success and end rate on the held-out task prompts (keywords never trained on); "
                "bits per byte on the val documents; reward-model numbers on each model's replies to held-out "
                "prompts.")
    chance = ev.get("chance") if isinstance(ev.get("chance"), dict) else {}
    if chance:
        note += " Chance: " + ", ".join(f"{k} {100 * v:.1f}%" if isinstance(v, int | float) else f"{k} {v}"
                                        for k, v in chance.items()) + "."
    blocks.append(("note", note))
    harms = ev.get("harms") if isinstance(ev.get("harms"), dict) else {}
    if harms:
        parts = [f"{k}: {v}" for k, v in harms.items()]
        blocks.append(("note", "Harms probe — " + "; ".join(parts) + "."))
    return blocks


def _form_blocks(info: dict, plots: dict[str, str]) -> list[tuple]:
    """The alignment part (demo_form.py): InstructGPT's steps 2 and 3 on verse in a form, judged by a program."""
    form = info.get("form") or {}
    if not form.get("sft"):
        return []
    pc = lambda x: f"{100 * x:.1f}%" if isinstance(x, int | float) else "—"  # noqa: E731
    rows = [["SFT (a few demonstrations)", pc(form["sft"]["greedy"]), pc(form["sft"]["greedy_en"]),
             pc(form["sft"]["greedy_zh"]), "", pc(form["sft"].get("sample_success")), "", "0"]]
    names = {"ppo_iter1": "PPO, iteration 1 (first reward model)",
             "ppo": "PPO, iteration 2 (refreshed reward model): the result",
             "grpo": "GRPO against the judge", "dpo": "DPO on the comparisons"}
    for key, name in names.items():
        m = form.get(key)
        if isinstance(m, dict):
            kl = f"{m['kl']:.2f}" if isinstance(m.get("kl"), int | float) else "—"
            sampled_gain = f"{100 * m['sample_gain']:+.1f}" if isinstance(m.get("sample_gain"), int | float) else "—"
            rows.append([name, pc(m["greedy"]), pc(m["greedy_en"]), pc(m["greedy_zh"]), f"{100 * m['gain']:+.1f}",
                         pc(m.get("sample_success")), sampled_gain, kl])
    best = form["best_of_n"][-1]
    rows.append([f"best-of-{best['n']} against the reward model (samples)", pc(best["gold"]), "", "", "", "", "",
                 f"{best['kl']:.2f}"])
    blocks: list[tuple] = [
        ("h2", "Alignment: verse in a form, judged by a program"),
        ("p", f"On {form['held_out_prompts']} held-out prompts: the SFT model's pass@8 at T = 1 is "
              f"{pc(form['sft']['pass_at_8'])} against {pc(form['sft']['greedy'])} greedy (headroom "
              f"{100 * form['headroom']:+.1f} points); the reward model ranks the SFT model's own good samples "
              f"above its bad ones with AUC {pc(form['rm_auc'])} (pairwise accuracy on held-out comparisons "
              f"{pc(form['rm_accuracy'])}). PPO runs as iterated RLHF: after its first iteration the judge "
              f"compares that policy's own samples, the reward model trains on them too (held-out accuracy "
              f"{pc(form.get('rm_iter2_accuracy'))}; AUC on the same SFT samples {pc(form.get('rm_iter2_auc'))}), "
              "and the second iteration goes on against it."),
        ("table", ["model", "gold success (greedy)", "English", "Chinese", "gain over SFT (points)",
                   "gold success of samples at T = 1", "gain (points)", "KL to SFT (nats/reply)"], rows)]
    if "overoptimisation" in plots:
        blocks.append(("img", plots["overoptimisation"], "Proxy (reward model) and gold (judge) against √KL: PPO's "
                                                         "rounds and best-of-n (Gao et al., 2022, Fig. 1)"))
    blocks.append(("note", "Which split: held-out keywords never trained on; the judge (tasks/form.py: check) "
                           "scores the form the prompt asks for and is never optimised by PPO."))
    return blocks


def _sample_blocks(info: dict) -> list[tuple]:
    samples = [s for s in info["eval"].get("samples", []) if isinstance(s, dict) and isinstance(s.get("replies"), dict)]
    blocks: list[tuple] = [("h2", "Samples: one held-out prompt, every model")]
    if not samples:
        return blocks + [("p", f"No samples yet — `chatforge eval --run {info['dir']}` writes them.")]
    blocks.append(("samples", samples[:MAX_SAMPLES]))
    if len(samples) > MAX_SAMPLES:
        blocks.append(("note", f"The first {MAX_SAMPLES} of {len(samples)} samples in eval.json."))
    blocks.append(("note", "Which split: the prompts are held-out task prompts; replies are as the model wrote them "
                           "(shown as text, markup escaped)."))
    return blocks


def _curve_blocks(info: dict, plots: dict[str, str]) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Training curves")]
    captions = {"loss": "Training loss per stage (dots: held-out loss where logged)",
                "pretrain_bpb": "Pre-training: held-out bits per byte, unigram baseline dashed",
                "lr": "Learning-rate schedules", "accuracy": "Held-out accuracy over training",
                "rl": "RL: reward, KL to the reference, entropy",
                "experts": "Mixture of experts: each expert's share of the routed tokens over training"}
    drawn = [k for k in captions if k in plots]
    if not drawn:
        return blocks + [("p", "No metrics.jsonl in any stage folder yet.")]
    for key in drawn:
        blocks.append(("img", plots[key], captions[key]))
    blocks.append(("note", "Which split: lines are training batches; dots, bits per byte and accuracies are on each "
                           "stage's held-out split; RL rewards are on the fresh training prompts of each round."))
    return blocks


def _energy_blocks(info: dict, plots: dict[str, str]) -> list[tuple]:
    blocks: list[tuple] = [("h2", "Energy and CO2")]
    headers, rows, totals = energy_table(info)
    if not info["energy"]:
        return blocks + [("p", "Not measured: no stage of this run wrote an energy.json.")]
    blocks.append(("table", headers, rows))
    if "energy" in plots:
        blocks.append(("img", plots["energy"], "Energy per stage"))
    words = {"grid_g_per_kwh": ("Grid intensity", " g CO2/kWh"), "pue": ("PUE", ""),
             "power_source": ("Power source", "")}
    measured = len(totals["stages"])
    parts = []
    for key, values in totals["assumptions"].items():
        name, unit = words[key]
        if values:
            parts.append(f"{name}: " + "; ".join(
                f"{_g(v)}{unit} ({'all measured stages' if len(s) == measured else ', '.join(s)})"
                for v, s in values.items()))
    blocks.append(("note", "Assumptions — " + ". ".join(parts) + ". kWh = W × seconds × PUE / 3,600,000; "
                           "g CO2 = kWh × grid intensity. A stage marked \"not measured\" wrote no energy.json, so "
                           "the totals cover the measured stages only."))
    blocks.append(("note", "Which split: none — energy is the cost of running each stage, not a held-out score."))
    return blocks


def _g(value: str) -> str:
    """450.0 → 450, 1.2 → 1.2; text stays as it is."""
    try:
        return f"{float(value):g}"
    except ValueError:
        return value


def _html(blocks: list[tuple], title: str, images: dict[str, str]) -> str:
    out = ["<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for block in blocks:
        kind = block[0]
        if kind == "h2":
            out.append(f"<h2>{html.escape(block[1])}</h2>")
        elif kind in ("p", "note"):
            out.append(f'<p class="{kind}">{md_inline_html(block[1])}</p>')
        elif kind == "table":
            head = "".join(f"<th>{md_inline_html(h)}</th>" for h in block[1])
            body = "".join("<tr>" + "".join(f"<td>{md_inline_html(c)}</td>" for c in row) + "</tr>" for row in block[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "img":
            out.append(f'<img src="data:image/png;base64,{images[block[1]]}" alt="{html.escape(block[2])}">')
        elif kind == "samples":
            for s in block[1]:
                cards = "".join(f'<div class="reply"><div class="who">{html.escape(str(m))}</div>'
                                f'<div class="text">{html.escape(str(r))}</div></div>'
                                for m, r in _ordered(s["replies"]))
                out.append(f'<div class="sample"><div class="prompt">{html.escape(_prompt_text(s.get("prompt")))}</div>'
                           f'<div class="replies">{cards}</div></div>')
    out.append("</body></html>\n")
    return "\n".join(out)


def _prompt_text(prompt: object) -> str:
    """A sample's prompt: a string, or a list of chat messages (shown as their contents, one per line)."""
    if isinstance(prompt, list):
        return "\n".join(str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt)
    return "" if prompt is None else str(prompt)


def _ordered(replies: dict) -> list[tuple[str, object]]:
    return [(m, replies[m]) for m in MODELS if m in replies] + [(m, r) for m, r in replies.items() if m not in MODELS]


def _markdown(blocks: list[tuple], title: str) -> str:
    out = [f"# {title}", ""]
    for block in blocks:
        kind = block[0]
        if kind == "h2":
            out += [f"## {block[1]}", ""]
        elif kind == "p":
            out += [" ".join(block[1].split()), ""]
        elif kind == "note":  # one line: an italic span must not cross a paragraph break
            out += [f"*{' '.join(block[1].split())}*", ""]
        elif kind == "table":
            out += [md_table(block[1], block[2])]
        elif kind == "img":
            out += [f"![{block[2]}]({block[1]})", ""]
        elif kind == "samples":
            for s in block[1]:
                out += [f"**Prompt:** {md_escape_text(_prompt_text(s.get('prompt')))}", ""]
                out += [md_table(["model", "reply"], [[m, md_escape_text(str(r))] for m, r in _ordered(s["replies"])])]
    return "\n".join(out).rstrip() + "\n"


def build_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write report.html (self-contained), report.md and the PNG plots for a run folder; returns the HTML path.

    Raises ChatforgeError when the folder does not exist, holds nothing to report, or a metrics line is broken.
    """
    info = load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else info["dir"] / "report"
    out.mkdir(parents=True, exist_ok=True)
    for name in PLOT_FILES:  # a plot this run can no longer draw must not linger from an earlier report
        (out / name).unlink(missing_ok=True)
    models = {m: v for m in MODELS if (v := model_metrics(info, m))}
    plots = draw_all(info, models, out)
    blocks = (_summary_blocks(info) + _model_blocks(info, models, plots) + _form_blocks(info, plots)
              + _sample_blocks(info)
              + _curve_blocks(info, plots) + _energy_blocks(info, plots))
    blocks.insert(0, ("p", f"Run folder: `{info['dir'].resolve()}`. Stages found: "
                           f"{', '.join(info['stages']) or 'none'}."))
    title = f"chatforge report — {info['dir'].resolve().name}"
    images = {name: base64.b64encode((out / name).read_bytes()).decode("ascii") for name in plots.values()}
    (out / "report.md").write_text(_markdown(blocks, title), encoding="utf-8")
    page = out / "report.html"
    page.write_text(_html(blocks, title, images), encoding="utf-8")
    return page
