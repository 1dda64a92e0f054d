"""User mistakes give one clear ChatforgeError (file, line or key, and the fix); the CLI exits 2 without a trace."""

import gzip

import pytest

from chatforge.cli import main
from chatforge.config import load_config
from chatforge.data.readers import iter_corpus
from chatforge.errors import ChatforgeError


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    return exit_info.value.code, capsys.readouterr().err


@pytest.mark.smoke
def test_missing_file_exits_2_without_traceback(capsys, tmp_path):
    code, err = run_cli(capsys, "tokenizer", "--data", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "t"))
    assert code == 2 and "nope.txt: no such file" in err and "Traceback" not in err
    assert not (tmp_path / "t").exists()


def test_corpus_with_no_text(capsys, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n   \n")
    code, err = run_cli(capsys, "tokenizer", "--data", str(empty), "--out", str(tmp_path / "t"))
    assert code == 2 and "no text" in err


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"text": "fine"}\n\n{"text": oops}\n')
    with pytest.raises(ChatforgeError, match=r"c.jsonl.gz:3: not valid JSON"):
        list(iter_corpus([path]))
    path2 = tmp_path / "d.jsonl"
    path2.write_text('{"body": "no text field"}\n')
    with pytest.raises(ChatforgeError, match=r"d.jsonl:1: .*\"text\""):
        list(iter_corpus([path2]))


def test_unknown_config_key_lists_valid_ones(tmp_path):
    with pytest.raises(ChatforgeError, match="unknown config key 'train.learning_rate'.*lr"):
        load_config(None, ["train.learning_rate=1e-3"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[model]\nlayers = 3\n")
    with pytest.raises(ChatforgeError, match=r"bad.toml: unknown config key 'model.layers'"):
        load_config(bad)


def test_vocab_too_small_from_cli(capsys, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text\n")
    code, err = run_cli(capsys, "tokenizer", "--data", str(corpus), "--vocab-size", "100", "--out", str(tmp_path))
    assert code == 2 and "--vocab-size 100 is too small" in err


def test_pretrain_without_prepared_data(capsys, tmp_path):
    code, err = run_cli(capsys, "pretrain", "--out", str(tmp_path / "r"), f"data.dir={tmp_path}/none")
    assert code == 2 and "chatforge prepare" in err


def test_resume_without_checkpoint(capsys, data_dir, tmp_path):
    code, err = run_cli(capsys, "pretrain", "--out", str(tmp_path / "r"), "--resume", f"data.dir={data_dir}",
                        "model.n_layer=1", "model.d_model=32", "model.n_head=2", "model.n_kv_head=0")
    assert code == 2 and "no checkpoint to resume from" in err


@pytest.mark.smoke
def test_generate_streams_from_the_cli(capsys, pretrained):
    main(["generate", "--run", str(pretrained[0]), "--prompt", "And God said", "--max-new-tokens", "12",
          "--temperature", "0", "--stop", "NEVER-APPEARS"])
    out = capsys.readouterr().out
    assert out.startswith("And God said") and len(out) > len("And God said") + 5


def test_classify_label_outside_the_training_labels(capsys, pretrained, tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n')
    val = tmp_path / "val.jsonl"
    val.write_text('{"text": "a", "label": "x"}\n{"text": "c", "label": "z"}\n')
    code, err = run_cli(capsys, "classify", "--init", str(pretrained[0]), "--data", str(train), "--val", str(val),
                        "--out", str(tmp_path / "cls"))
    assert code == 2 and "val.jsonl:2: label 'z' is not one of the training labels" in err
    assert not (tmp_path / "cls").exists()



def test_the_rl_commands_name_their_starting_model_init_and_keep_the_old_policy():
    """One name for one thing (issue 22): --init, as for sft, rm, dpo and classify; ppo and pairs still
    accept their old --policy."""
    from chatforge.cli import build_parser

    parser = build_parser()
    required = {"ppo": ["--reward", "r", "--prompts", "p"], "grpo": ["--prompts", "p"],
                "pairs": ["--prompts", "p", "--reward", "r", "--out", "o"]}
    for command, rest in required.items():
        assert parser.parse_args([command, "--init", "runs/x", *rest]).init == "runs/x"
    for command in ("ppo", "pairs"):
        assert parser.parse_args([command, "--policy", "runs/y", *required[command]]).init == "runs/y"
