"""Can this model copy? An induction-head probe (Olsson et al., 2022, "In-context learning and induction heads").

Each probe is a real Shakespeare line, a newline, and the same line again. A model with an induction head
predicts the second copy from the first (loss far below the first copy's); a model
without one predicts both copies about equally badly. The demo task's held-out keywords need exactly this
skill (docs/rlhf.md, "Third round"), so the probe tells whether RL has a copy to sharpen.

  .venv/bin/python scripts/induction_probe.py runs/demo/pretrain [--lines 200] [--seed 1]

Prints the mean loss (nats per token) and top-1 accuracy over tokens 2..L of each copy.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
import torch.nn.functional as F

from chatforge.model.io import load_run_model
from chatforge.tasks.verse import corpus_lines
from chatforge.tokenizer import load_tokenizer

CORPUS = Path(__file__).resolve().parents[1] / "data" / "demo" / "corpus.jsonl.gz"


@torch.no_grad()
def probe(run: str, n_lines: int = 200, seed: int = 1) -> dict[str, float]:
    model, tok = load_run_model(run), load_tokenizer(run)
    newline = tok.encode("\n").ids
    totals = {"loss_first": 0.0, "loss_second": 0.0, "top1_first": 0.0, "top1_second": 0.0}
    lines = random.Random(seed).sample(corpus_lines(CORPUS)[0], n_lines)
    for line in lines:
        ids = tok.encode(line).ids[: (model.cfg.context - len(newline)) // 2]
        seq = torch.tensor(ids + newline + ids)
        logits = model(seq[None, :-1])[0]  # (T, vocab)
        targets = seq[1:]
        loss = F.cross_entropy(logits, targets, reduction="none")
        hit = (logits.argmax(-1) == targets).float()
        n = len(ids)
        for name, part in (("first", slice(0, n - 1)), ("second", slice(n + len(newline), 2 * n + len(newline) - 1))):
            totals[f"loss_{name}"] += loss[part].mean().item() / n_lines
            totals[f"top1_{name}"] += hit[part].mean().item() / n_lines
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder with model.safetensors and tokenizer.json")
    parser.add_argument("--lines", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    r = probe(args.run, args.lines, args.seed)
    print(f"{args.run}: loss {r['loss_first']:.2f} on the first copy, {r['loss_second']:.2f} on the second; "
          f"top-1 {r['top1_first']:.0%} and {r['top1_second']:.0%}")


if __name__ == "__main__":
    main()
