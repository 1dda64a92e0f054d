"""Every stage's --help, in process and through the installed `chatforge` script: the first thing a user runs,
and the first check of a new Python version (`make smoke`)."""

import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.cli import build_parser, main


def stages() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sorted(sub.choices)


@pytest.mark.smoke
def test_every_stage_explains_itself_with_help(capsys):
    names = stages()
    assert {"tokenizer", "pretrain", "sft", "rm", "ppo", "dpo", "grpo", "serve", "chat", "demo"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exit_info:
            main([name, "--help"])
        out = capsys.readouterr().out
        assert exit_info.value.code == 0 and f"chatforge {name}" in out and len(out.splitlines()) >= 3, name


@pytest.mark.smoke
def test_the_installed_script_runs_on_this_python():
    script = Path(sys.executable).parent / "chatforge"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "chatforge <stage>" in done.stdout and "demo" in done.stdout
