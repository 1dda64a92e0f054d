"""`chatforge demo`: the whole pipeline on the bundled demo corpus, then `eval` and `report`.

Each stage writes its own folder under runs/demo. A stage whose folder is complete is skipped, and one
that was interrupted resumes from its latest checkpoint, so running the demo again after a crash or
Ctrl-C loses nothing. Every stage's time, power and CO2 go to its folder's energy.json; the held-out
numbers are collected in runs/demo/results.json, and the report in runs/demo/report/."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from chatforge.config import load_config
from chatforge.data.readers import iter_corpus
from chatforge.data.shards import prepare
from chatforge.errors import ChatforgeError
from chatforge.eval.energy import load_energy, measure
from chatforge.layout import DEMO_STEPS
from chatforge.model.generate import Sampling, stream_text
from chatforge.model.io import load_run_model
from chatforge.stages.classify import run_classify
from chatforge.stages.pretrain import run_pretrain
from chatforge.stages.reward import run_reward
from chatforge.stages.sft import run_sft
from chatforge.tasks.verse import TASK, build_source_labels, build_tasks
from chatforge.tokenizer import cjk_coverage, load_tokenizer, save_tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "data" / "demo" / "corpus.jsonl.gz"
PROMPTS = ["ROMEO:\n", "And God said, ", "床前明月光，"]
ALIGNERS = ("ppo", "dpo", "grpo")
TASK_FILES = ("sft_train.jsonl", "sft_val.jsonl", "prefs_train.jsonl", "prefs_val.jsonl", "prompts_train.jsonl",
              "prompts_heldout.jsonl", "copy_train.jsonl", "copy_val.jsonl", "sft_replay.jsonl", "prompts_rl.jsonl",
              "prefs_rl.jsonl", "prefs_rm.jsonl", "classify_train.jsonl", "classify_val.jsonl")


def run_stage(name: str, folder: Path, done: list[str], fn: Callable[[str | None], object]) -> dict:
    """Run one stage into `folder` unless the files in `done` are all there (then it is complete and
    skipped). A folder with checkpoints but not complete was interrupted: the stage resumes from its
    latest one. Returns the stage's eval.json (its held-out numbers), or {} for a stage without one."""
    if all((folder / f).is_file() for f in done):
        print(f"   {folder}: complete, skipped (delete the folder, or run with --fresh, to redo it)")
    else:
        resume = "latest" if any((folder / "checkpoints").glob("step_*")) else None
        if resume:
            print(f"   {folder}: interrupted earlier; resuming from its latest checkpoint")
        elif folder.exists():
            shutil.rmtree(folder)  # a stage without checkpoints that did not finish: start it again
        with measure(name, folder, accumulate=resume is not None):
            fn(resume)
    path = folder / "eval.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def run_copy(out: Path, tasks: Path, resume: str | None) -> None:
    """The copy phase (SFT on "Repeat this line"), then its own held-out numbers: the share of the
    copy_val lines (never trained on; half English, half Chinese) it repeats exactly, greedy, overall and
    by language, added to its eval.json."""
    from chatforge.eval.task import evaluate_task, load_prompts

    run_sft(load_config(REPO / "configs" / "demo-copy.toml"), out / "pretrain", tasks / "copy_train.jsonl",
            out / "copy", tasks / "copy_val.jsonl", resume)
    model, tok = load_run_model(out / "copy"), load_tokenizer(out / "copy")
    rows = load_prompts(str(tasks / "copy_val.jsonl"))
    result = json.loads((out / "copy" / "eval.json").read_text())
    samples, exact = [], 0.0
    for lang in ("en", "zh"):
        scored = evaluate_task(model, tok, [r for r in rows if r.get("lang") == lang], TASK, max_new_tokens=64)
        result[f"copy_exact_{lang}"] = scored["success"]
        exact += scored["success"] * scored["n"] / len(rows)
        samples += scored["samples"]
    result["copy_exact"] = exact
    (out / "copy" / "eval.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "copy" / "copy_samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")


def run_demo(out: str | Path = "runs/demo", config: str | None = None, overrides: list[str] | None = None,
             align: tuple[str, ...] = ("ppo",), fresh: bool = False) -> dict:
    """`align`: which of ppo, dpo, grpo to run after the reward model (in that order). `fresh`: delete
    the previous demo run first instead of continuing it."""
    out = Path(out)
    unknown = set(align) - set(ALIGNERS)
    if unknown:
        raise ChatforgeError(f"demo: unknown alignment method(s) {sorted(unknown)}; choose from {', '.join(ALIGNERS)}")
    if not CORPUS.is_file():
        raise ChatforgeError(f"{CORPUS}: the demo corpus is missing; rebuild it with scripts/build_demo_data.py")
    if fresh and out.exists():
        print(f"demo: --fresh: removing the previous demo run in {out}")
        shutil.rmtree(out)
    t0, r = time.perf_counter(), {}
    tasks, configs = out / "tasks", REPO / "configs"

    print("== 1/11 tokenizer: byte-level BPE on the demo corpus")
    run_stage("tokenizer", out / "tokenizer", ["tokenizer.json"],
              lambda _: save_tokenizer(train_tokenizer(lambda: iter_corpus([CORPUS]), 4096), out / "tokenizer"))
    whole, seen = cjk_coverage(load_tokenizer(out / "tokenizer"), lambda: iter_corpus([CORPUS]))
    print(f"   {whole:,} of the corpus's {seen:,} distinct Chinese characters are one token")

    print("== 2/11 prepare: token shards, split by document")
    run_stage("prepare", out / "data", ["meta.json"], lambda _: prepare([str(CORPUS)], out / "tokenizer", out / "data"))
    meta = json.loads((out / "data" / "meta.json").read_text())
    print(f"   train {meta['train']['tokens']:,} tokens, val {meta['val']['tokens']:,} tokens; "
          f"unigram baseline {meta['val_unigram_bpb']:.3f} bits/byte")

    print("== 3/11 pretrain")
    cfg = load_config(config or configs / "demo.toml", [f"data.dir={out / 'data'}", *(overrides or [])])
    pre = run_stage("pretrain", out / "pretrain", ["model.safetensors", "eval.json"],
                    lambda resume: run_pretrain(cfg, out / "pretrain", resume))
    r.update(val_bpb=pre["val_bpb"], val_loss=pre["val_loss"], unigram_bpb=pre["val_unigram_bpb"], params=pre["params"])
    print(f"   held-out: {pre['val_loss']:.3f} nats/token, {pre['val_bpb']:.3f} bits/byte (unigram baseline "
          f"{pre['val_unigram_bpb']:.3f})")
    model, tok = load_run_model(out / "pretrain"), load_tokenizer(out / "pretrain")
    for i, prompt in enumerate(PROMPTS):
        text = "".join(stream_text(model, tok, prompt, Sampling(max_new_tokens=50, top_p=0.95, seed=i)))
        print(f"   --- {prompt!r}\n{prompt}{text}")

    print("== 4/11 tasks: verse on request, from real corpus lines; held-out keywords")
    run_stage("tasks", tasks, list(TASK_FILES),
              lambda _: (build_tasks(CORPUS, tasks), build_source_labels(CORPUS, tasks)))

    print("== 5/11 copy: SFT on \"Repeat this line\", so that keywords never taught can be copied")
    cp = run_stage("copy", out / "copy", ["model.safetensors", "eval.json", "copy_samples.json"],
                   lambda resume: run_copy(out, tasks, resume))
    r.update({k: cp[k] for k in ("copy_exact", "copy_exact_en", "copy_exact_zh")})
    print(f"   held-out lines repeated exactly: {cp['copy_exact']:.0%} (English {cp['copy_exact_en']:.0%},"
          f" Chinese {cp['copy_exact_zh']:.0%})")

    print("== 6/11 sft: assistant-only loss on the instructions (and as many copy rows), from the copy phase")
    sft = run_stage("sft", out / "sft", ["model.safetensors", "eval.json"],
                    lambda resume: run_sft(load_config(configs / "demo-sft.toml"), out / "copy",
                                           tasks / "sft_replay.jsonl", out / "sft", tasks / "sft_val.jsonl", resume))
    r["sft_val_loss"] = sft.get("val_loss")
    print(f"   held-out loss on assistant tokens {sft['val_loss']:.3f}")

    print("== 7/11 rm: a reward model from the SFT model, on preference pairs (Bradley-Terry)")
    rm = run_stage("rm", out / "rm", ["reward.safetensors", "eval.json"],
                   lambda resume: run_reward(load_config(configs / "demo-rm.toml"), out / "sft",
                                             tasks / "prefs_rm.jsonl", tasks / "prefs_val.jsonl", out / "rm",
                                             resume=resume))
    r["rm_accuracy"] = rm["val_accuracy"]
    print(f"   held-out pairwise accuracy {rm['val_accuracy']:.1%} on {rm['val_pairs']} pairs (chance 50%)")

    print(f"== 8/11 align: InstructGPT's steps on verse in a form, a task with headroom; {', '.join(align) or 'none'}")
    from chatforge.demo_form import form_results, run_form

    form = run_form(out / "sft", tasks / "sft_replay.jsonl", out / "form", align)
    r.update(form_results(form, out / "form"))
    print(f"   SFT greedy {form['sft']['greedy']:.1%}, pass@8 {form['sft']['pass_at_8']:.1%} (headroom "
          f"{form['headroom']:+.1%}); reward model AUC on SFT's samples {form['rm_auc']:.1%}")
    for name in (a for a in ALIGNERS if a in form):
        kl = f", KL to SFT {form[name]['kl']:.2f} nats/reply" if "kl" in form[name] else ""
        print(f"   {name}: held-out gold success {form[name]['greedy']:.1%} ({form[name]['gain']:+.1%}){kl}")

    print("== 9/11 classify: which source is this line from?")
    cls = run_stage("classify", out / "classify", ["classifier.safetensors", "eval.json"],
                    lambda resume: run_classify(load_config(configs / "demo-classify.toml"), out / "pretrain",
                                                tasks / "classify_train.jsonl", tasks / "classify_val.jsonl",
                                                out / "classify", resume))
    r.update(classify_accuracy=cls["val_accuracy"], classify_majority=cls["majority_baseline"])
    print(f"   held-out accuracy {cls['val_accuracy']:.1%} (majority class {cls['majority_baseline']:.1%})")

    print("== 10/11 eval: every model on the held-out splits (bits/byte, task, WordNet choice, harms, reward model)")
    from chatforge.eval.suite import evaluate_runs

    report = evaluate_runs(out)
    for name, numbers in report["models"].items():
        for key in ("bpb", "success", "success_en", "success_zh", "end_rate", "choice_accuracy", "rm_score",
                    "rm_win_rate", "rm_auc", "toxic_rate", "refusal_rate", "over_refusal_rate"):
            if key in numbers:
                r[f"{name}_{key}"] = numbers[key]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in numbers.items() if isinstance(v, float))
        print(f"   {name}: {shown}")
    r["choice_chance"] = report["chance"]["choice"]

    for stage in DEMO_STEPS:
        energy = load_energy(out / stage)
        if energy:
            r[f"{'prepare' if stage == 'data' else stage}_seconds"] = round(energy["seconds"], 1)
    # the run's cost as it stands (a skipped stage counts what it cost when it ran), and this invocation's
    r["total_seconds"] = round(sum(v for k, v in r.items() if k.endswith("_seconds") and k != "align_seconds"), 1)
    r["this_run_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(r, indent=2) + "\n")

    print("== 11/11 report: numbers, plots, samples side by side, energy")
    from chatforge.report.build import build_report
    from chatforge.report.tables import results_table

    html = build_report(out)
    print(results_table(out))
    chat_run = out / "form" / align[0] if align else out / "sft"
    print(f"== demo done in {r['this_run_seconds']:.0f}s; report: {html} (and report.md beside it)\n"
          f"   .venv/bin/chatforge chat --run {chat_run}\n"
          f"   .venv/bin/chatforge serve --run {out}     # web chat + arena of every model: http://127.0.0.1:8000/")
    return r
