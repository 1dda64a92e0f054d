"""Data parallelism on CPU through torchrun (gloo, 2 processes): DDP and FSDP give the losses of one process
with the same global batch at every step and the same weights after training; a sharded checkpoint written
by 2 ranks resumes on 1 and continues with the uninterrupted run's losses; a crashed rank fails the job."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6


def overrides(data_dir) -> list[str]:
    # fp32 and a small learning rate: the comparison is to 1e-5, below bf16's precision, and Adam turns a
    # rounding difference in a tiny gradient into a change of up to lr
    return [f"data.dir={data_dir}", "model.n_layer=2", "model.d_model=64", "model.n_head=4", "model.n_kv_head=2",
            "model.context=32", "train.batch_size=8", f"train.steps={STEPS}", "train.warmup_steps=2",
            "train.eval_every=3", "train.eval_batches=1", "train.checkpoint_every=3", "train.log_every=1",
            "train.precision=fp32", "train.device=cpu", "train.lr=3e-4", "train.min_lr=3e-5"]


def run(args: list[str], ranks: int = 0, timeout: int = 240) -> subprocess.CompletedProcess:
    """`chatforge ARGS` in a fresh process, or under torchrun with `ranks` processes."""
    launch = [sys.executable, "-m", "chatforge"]
    if ranks:
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_port",
                  "0", "--rdzv_backend", "c10d", "--rdzv_endpoint", "127.0.0.1:0", "-m", "chatforge"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(launch + args, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def largest_difference(a, b) -> float:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory):
    """The reference: one process, global micro-batch 8."""
    out = tmp_path_factory.mktemp("dist") / "single"
    done = run(["pretrain", "--config", "configs/demo.toml", "--out", str(out), *overrides(data_dir)])
    assert done.returncode == 0, done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def fsdp(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "fsdp"
    done = run(["pretrain", "--config", "configs/demo.toml", "--out", str(out), *overrides(data_dir),
                "train.parallel=fsdp"], ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_ddp_on_two_ranks_equals_one_process(single, data_dir, tmp_path):
    out = tmp_path / "ddp"
    done = run(["pretrain", "--config", "configs/demo.toml", "--out", str(out), *overrides(data_dir),
                "train.parallel=ddp"], ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(losses(out)) == STEPS
    assert losses(out) == pytest.approx(losses(single), abs=1e-5)
    assert largest_difference(out, single) < 1e-5
    assert done.stdout.count("pretrain: val loss") == 1  # rank 0 alone prints and writes


def test_fsdp_on_two_ranks_equals_one_process(single, fsdp):
    assert losses(fsdp) == pytest.approx(losses(single), abs=1e-5)
    assert largest_difference(fsdp, single) < 1e-5
    state = json.loads((fsdp / "checkpoints" / "step_3" / "state.json").read_text())
    assert state["format"] == "sharded" and state["world_size"] == 2
    shards = sorted((fsdp / "checkpoints" / "step_3" / "sharded").glob("*.safetensors"))
    assert len(shards) == 2 and not list((fsdp / "checkpoints").rglob("*.metadata"))  # no pickled metadata


def test_sharded_checkpoint_resumes_on_one_rank_and_consolidates(fsdp, data_dir, tmp_path):
    resumed = tmp_path / "resumed"
    done = run(["pretrain", "--config", "configs/demo.toml", "--out", str(resumed), *overrides(data_dir),
                "train.parallel=fsdp", "--resume-from", str(fsdp / "checkpoints" / "step_3")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(resumed) == pytest.approx(losses(fsdp)[3:], abs=1e-5)  # steps 4..6 of the 2-rank run
    assert largest_difference(resumed, fsdp) < 1e-5
    full = tmp_path / "step_3-full"
    done = run(["consolidate", "--checkpoint", str(fsdp / "checkpoints" / "step_3"), "--out", str(full)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (full / "model.safetensors").is_file() and "format" not in json.loads((full / "state.json").read_text())
    plain = tmp_path / "plain"
    done = run(["pretrain", "--config", "configs/demo.toml", "--out", str(plain), *overrides(data_dir),
                "--resume-from", str(full)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(plain) == pytest.approx(losses(fsdp)[3:], abs=1e-5)


def test_a_crashed_rank_fails_the_whole_job_without_hanging(data_dir, tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        import os, sys
        from chatforge.cli import main
        from chatforge.stages import pretrain

        calls = []
        real_loss = pretrain.language_model_loss

        def loss(model, batch):
            calls.append(1)
            if os.environ["RANK"] == "1" and len(calls) == 3:
                raise RuntimeError("rank 1 fails on purpose")
            return real_loss(model, batch)

        pretrain.language_model_loss = loss
        main(sys.argv[1:])
    """))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", "127.0.0.1:0", str(script), "pretrain", "--config", "configs/demo.toml",
              "--out", str(tmp_path / "crash"), *overrides(data_dir), "train.parallel=ddp"]
    done = subprocess.run(launch, cwd=REPO, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert "rank 1 fails on purpose" in done.stderr


def test_parallel_none_under_several_ranks_is_a_clear_error(data_dir, tmp_path):
    done = run(["pretrain", "--config", "configs/demo.toml", "--out", str(tmp_path / "x"), *overrides(data_dir)],
               ranks=2)
    assert done.returncode != 0 and "train.parallel=ddp" in done.stderr


def test_ddp_with_gradient_accumulation_equals_one_process(data_dir, tmp_path):
    """no_sync on all but the last micro-batch: still the one-process numbers."""
    accum = ["train.grad_accum=2", "train.batch_size=4"]
    one, ddp = tmp_path / "one", tmp_path / "ddp"
    done = run(["pretrain", "--config", "configs/demo.toml", "--out", str(one), *overrides(data_dir), *accum])
    assert done.returncode == 0, done.stderr[-2000:]
    done = run(["pretrain", "--config", "configs/demo.toml", "--out", str(ddp), *overrides(data_dir), *accum,
                "train.parallel=ddp"], ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(ddp) == pytest.approx(losses(one), abs=1e-5)
    assert largest_difference(ddp, one) < 1e-5


def test_each_rank_reads_its_own_stride_of_the_global_batch(monkeypatch):
    import numpy as np

    from chatforge.data.chat import ExampleSampler
    from chatforge.data.shards import WindowSampler
    from chatforge.train import distributed

    tokens = np.arange(10_000, dtype=np.uint16)

    def batches(rank: int, world: int):
        monkeypatch.setattr(distributed, "rank_world", lambda: (rank, world))
        return WindowSampler(tokens, 16, 8, seed=3).next_batch()[0], ExampleSampler(100, 8, seed=3).next_indices()

    whole, whole_idx = batches(0, 1)
    (a, a_idx), (b, b_idx) = batches(0, 2), batches(1, 2)
    assert len(a) == len(b) == 4 and len(a_idx) == len(b_idx) == 4
    assert (a == whole[0::2]).all() and (b == whole[1::2]).all()  # disjoint halves of the same global batch
    assert a_idx == whole_idx[0::2] and b_idx == whole_idx[1::2]


def test_activation_checkpointing_and_compile_setting(data_dir, tmp_path):
    from chatforge.config import load_config
    from chatforge.errors import ChatforgeError
    from chatforge.model.transformer import Block
    from chatforge.stages.pretrain import run_pretrain
    from chatforge.train.loop import use_compile

    calls = {"n": 0}
    block_forward = Block.forward

    def counted(self, *args):
        calls["n"] += 1
        return block_forward(self, *args)

    cfg = lambda *extra: load_config(f"{REPO}/configs/demo.toml", [*overrides(data_dir), "train.steps=3", *extra])
    Block.forward = counted
    try:
        plain = run_pretrain(cfg(), tmp_path / "plain")
        plain_calls, calls["n"] = calls["n"], 0
        recomputed = run_pretrain(cfg("train.activation_checkpointing=true"), tmp_path / "ckpt")
    finally:
        Block.forward = block_forward
    assert calls["n"] == plain_calls + 3 * 2  # every block (2) runs again in each step's backward (3)
    assert recomputed["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-6)
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
    import torch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not use_compile("auto", cpu) and use_compile("auto", cuda) and use_compile(True, cpu)
    assert not use_compile("false", cuda)
    with pytest.raises(ChatforgeError, match="train.compile"):
        use_compile("sometimes", cpu)


def test_grpo_under_ddp_each_rank_its_rollouts(sft_run, tasks, tmp_path):
    """RL under torchrun: each rank samples its own prompts' replies, gradients are averaged, rank 0 saves."""
    out = tmp_path / "grpo"
    rl = ["--init", str(sft_run[0]), "--reward", "chatforge.tasks.verse:reward", "--prompts",
          str(tasks / "prompts_train.jsonl"), "--config", "configs/demo-grpo.toml", "--out", str(out),
          "train.steps=2", "train.batch_size=8", "rl.prompts_per_rollout=4", "rl.group_size=2", "rl.max_new_tokens=8",
          "train.log_every=1", "train.checkpoint_every=2", "train.device=cpu"]
    done = run(["grpo", *rl, "train.parallel=ddp"], ranks=2)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(math.isfinite(r["reward"] + r["kl"]) for r in rows)
    assert (out / "model.safetensors").is_file() and (out / "eval.json").is_file()
    rl[rl.index(str(out))] = str(tmp_path / "fsdp")
    done = run(["grpo", *rl, "train.parallel=fsdp"], ranks=2)
    assert done.returncode != 0 and "use ddp" in done.stderr


def test_an_moe_model_under_ddp_and_fsdp_equals_one_process(data_dir, tmp_path):
    """Every expert runs on every rank (on zero rows if none of its tokens are there), so DDP's gradient
    all-reduce and FSDP's shards see each weight. The balance loss is each rank's own, as in Switch and
    GShard (E Σ f_i P_i of a rank's tokens is not the global batch's), so it is off here to compare exactly;
    the z-loss is a mean over tokens and stays on."""
    moe = ["model.style=llama", "model.moe.n_experts=4", "model.moe.top_k=2", "model.moe.aux_coef=0"]
    outs = {name: tmp_path / name for name in ("one", "ddp", "fsdp")}
    for name, out in outs.items():
        parallel = [] if name == "one" else [f"train.parallel={name}"]
        done = run(["pretrain", "--config", "configs/demo.toml", "--out", str(out), *overrides(data_dir), *moe,
                    *parallel], ranks=0 if name == "one" else 2)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("ddp", "fsdp"):
        assert losses(outs[name]) == pytest.approx(losses(outs["one"]), abs=1e-5), name
        assert largest_difference(outs[name], outs["one"]) < 1e-5, name
