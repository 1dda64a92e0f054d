"""`chatforge report`: its flags and what it prints; the report itself is report/build.py."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_report(args: argparse.Namespace) -> None:
    from chatforge.report.build import build_report
    from chatforge.report.tables import results_table, update_readme

    html = build_report(args.run, args.out)
    print(results_table(args.run))
    print(f"report: {html} (and report.md beside it)")
    for path in args.readme or []:  # README.zh-CN.md gets the Chinese table
        lang = "zh" if ".zh" in Path(path).name else "en"
        changed = update_readme(path, results_table(args.run, lang))
        print(f"report: {path}: results table {'updated' if changed else 'already up to date'}")


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="one HTML page (and Markdown) of a run: numbers, plots, samples, energy")
    p.add_argument("--run", default="runs/demo", help="the run folder (default runs/demo)")
    p.add_argument("--out", help="folder for report.html, report.md and the plots (default RUN/report)")
    p.add_argument("--readme", nargs="+", metavar="FILE", help="also rewrite the results table between the "
                   "<!-- results:start --> and <!-- results:end --> lines of these files (*.zh*.md in Chinese)")
    p.set_defaults(func=cmd_report)
