"""The spread of every learning test's asserted number over seeds and precisions, on this machine.

A learning test asserts a held-out number a short training run reached (`@pytest.mark.learning`); its margin
must hold on any CPU CI meets, in fp32 and bf16. This runs those tests once per seed and precision, each time
recording the asserted numbers (the `measured` fixture), and prints one Markdown row per number: the table in
docs/testing.md, from which each margin is set.

    .venv/bin/python scripts/learning_spread.py --seeds 1337 1 2 --precisions fp32 [--out spread.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_tests(seed: int, precision: str, record: Path, tests: str) -> int:
    env = os.environ | {"CHATFORGE_TEST_SEED": str(seed), "CHATFORGE_TEST_PRECISION": precision,
                        "CHATFORGE_TEST_RECORD": str(record)}
    # failures are part of the answer (their numbers are recorded before the assert), so they do not stop the run
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "learning", "-p", "no:cacheprovider", "-k", tests]
    return subprocess.run(cmd, cwd=REPO, env=env).returncode


def table(rows: list[dict]) -> str:
    by_number: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_number[(r["test"], r["name"])].append(r)
    lines = ["| test | number | runs | min | mean | max | machines |", "|---|---|---|---|---|---|---|"]
    for (test, name), runs in sorted(by_number.items()):
        values = [r["value"] for r in runs]
        kinds = ", ".join(sorted({f"{r['cpu']} {r['precision']}" for r in runs}))
        lines.append(f"| {test} | {name} | {len(values)} | {min(values):.3f} | {statistics.mean(values):.3f} "
                     f"| {max(values):.3f} | {kinds} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1, 2])
    p.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"],
                   help="bf16 is emulated (about 30x slower) where the CPU lacks AVX-512-bf16")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "learning_spread.jsonl",
                   help="the recorded numbers, one JSON row each; appended to, so runs on other machines add up")
    p.add_argument("-k", dest="tests", default="", help="pytest -k expression: only these learning tests")
    p.add_argument("--table-only", action="store_true", help="print the table of --out without running anything")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for precision in args.precisions:
            for seed in args.seeds:
                print(f"== seed {seed}, {precision}", flush=True)
                run_tests(seed, precision, args.out, args.tests)
    print(table([json.loads(line) for line in args.out.read_text().splitlines()]))


if __name__ == "__main__":
    main()
