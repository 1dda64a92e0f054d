"""`chatforge report` on a synthetic run folder: the HTML opens offline in a real browser with every plot drawn,
the tables carry the input numbers, absent stages say so, model text is escaped, and the README table
round-trips between its markers."""

import json
import re
import shutil
from pathlib import Path

import pytest

from chatforge.errors import ChatforgeError
from chatforge.report.build import build_report
from chatforge.report.tables import model_table, results_table, update_readme

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic"]
SCRIPT_REPLY = "<script>window.pwned = 1</script> & <b>bold</b> | pipe"
CHINESE = "春眠不觉晓,处处闻啼鸟。"
# kWh per folder; ppo has no energy.json on purpose ("not measured").
ENERGY = {"tokenizer": 0.0012, "data": 0.0034, "pretrain": 0.0456, "sft": 0.0321, "rm": 0.0111, "eval": 0.0007}
CO2 = {k: v * 450 for k, v in ENERGY.items()}
EXPECTED_PLOTS = {"loss.png", "pretrain_bpb.png", "lr.png", "rl.png", "accuracy.png", "success.png", "energy.png"}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False), encoding="utf-8")


def _train_rows(n: int, start_loss: float, lr: float, every: int = 10, **val) -> list[dict]:
    rows = []
    for i in range(1, n + 1):
        row = {"step": i * every, "loss": start_loss * (0.97 ** i), "lr": lr * min(1.0, i / 3) * (1 - i / (2 * n)),
               "grad_norm": 1.0 / i, "tokens_per_s": 5000.0 + i}
        if i % 5 == 0:
            row.update({k: f(i) for k, f in val.items()})
        rows.append(row)
    return rows


def make_run(root: Path) -> Path:
    """pretrain, sft, rm and ppo with metrics; no dpo, grpo or classify folders."""
    run = root / "run"
    _write_jsonl(run / "pretrain" / "metrics.jsonl", _train_rows(
        20, 7.0, 3e-3, val_loss=lambda i: 6.0 - i / 10, val_bpb=lambda i: 2.345 if i == 20 else 2.345 + (20 - i) / 20))
    _write_json(run / "pretrain" / "eval.json", {"val_loss": 4.5, "val_bpb": 2.345, "params": 1_234_567,
                                                 "val_unigram_bpb": 3.1416, "val_unigram_entropy": 6.5})
    (run / "pretrain" / "config.toml").write_text(
        '[model]\nstyle = "llama"\ncontext = 64\n[train]\nsteps = 200\nbatch_size = 8\ngrad_accum = 1\n', "utf-8")
    _write_jsonl(run / "sft" / "metrics.jsonl", _train_rows(10, 5.0, 2e-3, val_loss=lambda i: 4.4))
    _write_json(run / "sft" / "eval.json", {"val_loss": 4.4})
    _write_jsonl(run / "rm" / "metrics.jsonl", _train_rows(15, 0.7, 5e-4, val_accuracy=lambda i: 0.6 + i / 100))
    _write_json(run / "rm" / "eval.json", {"val_accuracy": 0.7654, "val_pairs": 321})
    _write_jsonl(run / "ppo" / "metrics.jsonl", [
        {"step": 2 * i, "loss": 0.1, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 3000.0, "reward": -1.0 + i / 10,
         "kl": i / 20, "kl_coef": 0.05, "reply_tokens": 14.0, "end_rate": 1.0, "policy_loss": -0.1,
         "value_loss": 1.0, "clip_fraction": 0.01} for i in range(1, 16)])
    _write_json(run / "ppo" / "eval.json", {"val_reward": 0.9, "val_kl": 0.75, "val_end_rate": 1.0})
    _write_json(run / "data" / "meta.json", {"vocab_size": 4096, "train": {"documents": 900, "tokens": 1_500_000,
                                             "bytes": 4_800_000}, "val": {"documents": 45, "tokens": 80_000,
                                                                          "bytes": 256_000}})
    for stage, kwh in ENERGY.items():
        _write_json(run / stage / "energy.json", {
            "stage": stage, "seconds": 100.0, "device": "cpu", "watts": kwh * 3.6e6 / 100.0, "power_source": "tdp",
            "pue": 1.2, "kwh": kwh, "grid_g_per_kwh": 450.0, "co2_g": CO2[stage]})
    _write_json(run / "results.json", {"tokenizer_seconds": 2.4, "prepare_seconds": 4.7, "pretrain_seconds": 135.2,
                                       "val_bpb": 2.345, "unigram_bpb": 3.1416, "params": 1_234_567,
                                       "sft_seconds": 150.1, "base_success": 0.0, "base_end_rate": 0.0,
                                       "sft_success": 0.125, "sft_end_rate": 0.9, "rm_seconds": 81.1,
                                       "rm_accuracy": 0.7654, "ppo_seconds": 77.2, "ppo_success": 0.1875,
                                       "ppo_end_rate": 1.0, "ppo_kl": 0.75, "total_seconds": 450.0})
    model = {"bpb": 2.345, "success": 0.0, "end_rate": 0.0, "choice_accuracy": 0.3125, "choice_accuracy_norm": 0.3,
             "toxicity": 0.0123, "toxic_rate": 0.0, "refusal_rate": 0.0, "over_refusal_rate": 0.0, "task_prompts": 16}
    _write_json(run / "eval.json", {
        "models": {"base": model, "sft": {**model, "bpb": 2.5, "success": 0.125, "end_rate": 0.9, "rm_score": 0.61,
                           "rm_auc": 0.53125},
                   "ppo": {**model, "bpb": 2.6, "success": 0.1875, "end_rate": 1.0, "rm_score": 0.42,
                           "rm_win_rate": 0.4375, "rm_auc": 0.6875}},
        "splits": {"bpb": "val documents", "task": "held-out keywords", "choice": "held-out questions"},
        "chance": {"choice": 0.25},
        "harms": {"lexicon": "a small word list", "prompts": 48, "limits": "a lexicon misses paraphrase"},
        "samples": [{"prompt": "Write a line that contains the word 'crown'.",
                     "replies": {"base": SCRIPT_REPLY, "sft": "The crown is heavy.", "ppo": "crown crown"}},
                    {"prompt": "写一句含有“月”的诗。", "replies": {"base": "...", "sft": CHINESE, "ppo": "明月"}}]})
    return run


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[Path, Path]:
    run = make_run(tmp_path_factory.mktemp("report"))
    return run, build_report(run)


def _md_row(md: str, first_cell: str, section: str = "") -> list[str]:
    """The cells of the first Markdown table row starting with `first_cell`, after the heading `section`."""
    for line in md[md.index(section):].splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no row {first_cell!r} in report.md")


def test_html_opens_offline_with_every_plot(report):
    sync_api = pytest.importorskip("playwright.sync_api")
    _, page_path = report
    requests: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.route(re.compile(r"^(https?|wss?|ftp)://"), lambda route: route.abort())
            page.on("request", lambda r: requests.append(r.url))
            page.goto(page_path.as_uri(), wait_until="load")
            images = page.evaluate("() => Array.from(document.images).map(i => "
                                   "({ok: i.complete && i.naturalWidth > 0, src: i.src.slice(0, 22)}))")
            text = page.inner_text("body")
            pwned = page.evaluate("() => window.pwned")
        finally:
            browser.close()
    assert len(images) >= len(EXPECTED_PLOTS)
    assert all(i["ok"] for i in images), images
    assert all(i["src"] == "data:image/png;base64," for i in images)
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    assert pwned is None  # the reply's <script> did not run ...
    assert SCRIPT_REPLY in text  # ... it shows as text
    assert CHINESE in text and "写一句含有“月”的诗。" in text


def test_tables_carry_the_numbers(report):
    run, page_path = report
    page = page_path.read_text(encoding="utf-8")
    md = (page_path.parent / "report.md").read_text(encoding="utf-8")
    assert '<meta charset="utf-8">' in page
    for text in (page, md):
        assert "2.345" in text and "3.142" in text  # pre-training bpb and its unigram baseline
        assert "76.5%" in text and "321 held-out pairs" in text  # reward model
        assert "12.5%" in text and "18.8%" in text  # SFT and PPO held-out success
        assert "31.2%" in text  # a multiple-choice accuracy from eval.json
        assert "1.2 M params" in text and "200 steps × 512 tokens" in text
    for stage in ("DPO", "GRPO", "classify"):
        assert "not run yet" in _md_row(md, stage)[1]
    assert "not run yet" not in _md_row(md, "pretrain")[1]
    base = _md_row(md, "base", "## Models")
    assert base[1] == "2.345" and base[-1] == "—"  # base has no reward-model score
    assert _md_row(md, "ppo", "## Energy")[2] == "not measured"  # no ppo/energy.json
    total = _md_row(md, "**total (measured stages)**", "## Energy")
    assert total[5] == f"**{sum(ENERGY.values()):.3g}**" and total[6] == f"**{sum(CO2.values()):.3g}**"
    assert f"<b>{sum(ENERGY.values()):.3g}</b>" in page
    assert "Grid intensity: 450 g CO2/kWh (all measured stages)" in md and "PUE: 1.2" in md
    assert md.count("Which split") >= 4
    rows = [line for line in md.splitlines() if "tells each model's own held-out replies apart" in line]
    assert len(rows) == 1 and "SFT 53.1% / PPO 68.8%" in rows[0] and "blind 50%" in rows[0]


def test_markdown_references_existing_pngs(report):
    _, page_path = report
    md = (page_path.parent / "report.md").read_text(encoding="utf-8")
    files = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert set(files) == EXPECTED_PLOTS
    for name in files:
        assert (page_path.parent / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_text_is_escaped_and_chinese_intact(report):
    _, page_path = report
    page = page_path.read_text(encoding="utf-8")
    md = (page_path.parent / "report.md").read_text(encoding="utf-8")
    assert "<script" not in page and "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
    assert "<script" not in md and "<b>bold</b>" not in md
    assert CHINESE in page and CHINESE in md


def test_results_table_and_readme_round_trip(report, tmp_path):
    run, _ = report
    en, zh = results_table(run), results_table(run, "zh")
    assert en.splitlines()[0] == "| stage | what is measured (held-out) | result | baseline | time |"
    assert "| pretrain |" in en and "**2.345** bpb (4.500 nats/token)" in en and "135 s" in en
    assert "constraint success (checker), 16 held-out prompts | **12.5%** | base model 0.0% | (same) |" in en
    assert "| 预训练 |" in zh and "**2.345** bpb(4.500 nats/词元)" in zh and "135 秒" in zh
    assert "DPO" not in en and "not run yet" not in en  # the README table lists only stages the run has
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:start -->\n| old | table |\n<!-- results:end -->\nafter\n", "utf-8")
    assert update_readme(readme, en) is True
    text = readme.read_text(encoding="utf-8")
    assert text == "intro\n<!-- results:start -->\n" + en + "<!-- results:end -->\nafter\n"
    assert update_readme(readme, en) is False  # same table: file untouched
    bare = tmp_path / "NOMARKERS.md"
    bare.write_text("# no markers here\n", encoding="utf-8")
    with pytest.raises(ChatforgeError, match="NOMARKERS.md"):
        update_readme(bare, en)


def test_errors_name_the_folder_or_line(tmp_path):
    with pytest.raises(ChatforgeError, match="nope"):
        build_report(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatforgeError, match="nothing to report"):
        build_report(tmp_path / "empty")
    bad = tmp_path / "bad"
    _write_jsonl(bad / "sft" / "metrics.jsonl", _train_rows(2, 5.0, 1e-3))
    with (bad / "sft" / "metrics.jsonl").open("a") as f:
        f.write("{not json\n")
    with pytest.raises(ChatforgeError, match=r"metrics\.jsonl:3"):
        build_report(bad)


def test_run_without_eval_or_energy_still_reports(tmp_path):
    run = tmp_path / "half"
    _write_json(run / "results.json", {"val_bpb": 2.05, "base_success": 0.0, "sft_success": 0.11})
    page = build_report(run, tmp_path / "out").read_text(encoding="utf-8")
    assert "2.050" in page and "11.0%" in page
    assert "No samples yet" in page and "no stage of this run wrote an energy.json" in page
    assert "PPO</td><td>not run yet" in page


def test_a_single_stage_run_folder_reports_its_stage(tmp_path):
    """`chatforge report --run runs/x` where runs/x is one `chatforge rm --out runs/x` run."""
    run = tmp_path / "rm-run"
    _write_jsonl(run / "metrics.jsonl", _train_rows(10, 0.69, 1e-4, val_accuracy=lambda i: 0.6 + i / 100))
    _write_json(run / "reward.json", {"model": {}})
    _write_json(run / "eval.json", {"val_accuracy": 0.777, "val_pairs": 321})
    _write_json(run / "energy.json", {"stage": "rm", "seconds": 12.0, "watts": 20.0, "kwh": 12 / 3600 * 0.02,
                                      "co2_g": 12 / 3600 * 0.02 * 475, "grid_g_per_kwh": 475, "power_source": "x"})
    table = results_table(run)
    assert "77.7%" in table and "321 held-out pairs" in table and "12.0 s" in table
    page = build_report(run, tmp_path / "out").read_text(encoding="utf-8")
    assert page.count("data:image/png;base64,") >= 2  # its loss curve and its held-out accuracy


def test_the_copy_phase_has_its_row_before_sft(tmp_path):
    run = make_run(tmp_path)
    assert "| copy |" not in results_table(run)  # a run without a copy phase: no row
    _write_json(run / "copy" / "eval.json", {"val_loss": 0.13, "copy_exact": 0.96, "copy_exact_en": 0.98,
                                              "copy_exact_zh": 0.94})
    en, zh = results_table(run), results_table(run, "zh")
    row = next(line for line in en.splitlines() if line.startswith("| copy |"))
    assert "repeated exactly" in row and "**96.0%** (English 98.0%, Chinese 94.0%)" in row
    assert en.index("| copy |") < en.index("| SFT |")
    assert "| 复制 |" in zh and "**96.0%** (英文 98.0%,中文 94.0%)" in zh


def test_the_alignment_part_has_its_rows_section_and_overoptimisation_plot(tmp_path):
    run = make_run(tmp_path)
    lang = {"greedy_en": 0.5, "greedy_zh": 0.125}
    rounds = [{"step": 4 * i, "kl": i / 2, "reward": -1 + i / 5, "gold": 0.3 + i / 50, "distinct_2": 0.6}
              | ({"iteration": 2} if i > 5 else {}) for i in range(1, 11)]  # iterated RLHF: two reward models
    _write_json(run / "form" / "eval.json", {
        "seed": 1, "held_out_prompts": 300, "headroom": 0.275, "rm_auc": 0.9321, "rm_accuracy": 0.9012,
        "sft": {"greedy": 0.3125, "pass_at_8": 0.5875, "sample_success": 0.25, **lang},
        "ppo_iter1": {"greedy": 0.25, "gain": -0.0625, "kl": 2.5, **lang}, "rm_iter2_accuracy": 0.95,
        "rm_iter2_auc": 0.9743,
        "ppo": {"greedy": 0.4375, "gain": 0.125, "kl": 4.56, "rounds": rounds, "sample_success": 0.375,
                "sample_gain": 0.125, **lang},
        "dpo": {"greedy": 0.25, "gain": -0.0625, **lang},
        "best_of_n": [{"n": n, "kl": 0.1 * n, "gold": 0.3 + n / 100, "proxy": n / 10} for n in (1, 2, 4, 8, 16)]})
    _write_json(run / "form" / "ppo" / "energy.json", {  # the alignment part's steps count in the energy total
        "stage": "ppo", "seconds": 40.0, "device": "cpu", "watts": 20.0, "power_source": "tdp", "pue": 1.2,
        "kwh": 0.5, "grid_g_per_kwh": 450.0, "co2_g": 225.0})
    page = build_report(run)
    md = (page.parent / "report.md").read_text(encoding="utf-8")
    assert _md_row(md, "form/ppo", "## Energy")[1] == "40 s"
    total = _md_row(md, "**total (measured stages)**", "## Energy")
    assert total[5] == f"**{sum(ENERGY.values()) + 0.5:.3g}**"
    assert (page.parent / "overoptimisation.png").is_file()
    section = md[md.index("## Alignment: verse in a form"):]
    assert "headroom +27.5 points" in section and "AUC 93.2%" in section
    second = _md_row(md, "PPO, iteration 2 (refreshed reward model): the result", "## Alignment")
    assert second[1:8] == ["43.8%", "50.0%", "12.5%", "+12.5", "37.5%", "+12.5", "4.56"]
    first = _md_row(md, "PPO, iteration 1 (first reward model)", "## Alignment")
    assert first[1:8] == ["25.0%", "50.0%", "12.5%", "-6.2", "—", "—", "2.50"]
    assert "held-out accuracy 95.0%; AUC on the same SFT samples 97.4%" in section
    # the per-model table: the aligned models are form/'s, not verse stages that are "not run yet"
    models = {"base": {"bpb": 2.1}, "sft": {"bpb": 3.4}}
    _, rows = model_table({"stages": {"pretrain": {}, "sft": {}}, "form": {"sft": {}}}, models)
    assert [r[0] for r in rows] == ["base", "sft"]
    _, rows = model_table({"stages": {"pretrain": {}, "sft": {}}}, models)
    assert rows[2][1] == "not run yet (no ppo/ folder)"
    table = results_table(run)
    assert "31.2% / **58.8%** (+27.5)" in table and "**93.2%**; 90.1%; refreshed **97.4%**" in table
    assert "**43.8%** (+12.5) (50.0% / 12.5%); sampled **37.5%** (+12.5); KL 4.56" in table
    assert "**25.0%** (-6.2)" in table and "; sampled 25.0%" in table  # SFT's samples, the baseline
    assert "GRPO against the judge" not in table  # not run: no row, and no "not run yet" for the verse stages
