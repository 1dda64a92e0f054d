"""PPO and GRPO on the session's small SFT model: batched generation, the stages end to end, the
behaviour the equations promise, and bad input."""

import hashlib
import json
import math
import random
from pathlib import Path

import pytest
import torch

from chatforge.config import RLConfig
from chatforge.errors import ChatforgeError
from chatforge.model.generate import Sampling, generate_batch, generate_ids
from chatforge.model.io import load_run_model
from chatforge.model.transformer import ModelConfig, Transformer
from chatforge.stages.grpo import run_grpo
from chatforge.stages.ppo import ActorCritic, explained_variance, gae, ppo_loss, run_ppo, whiten
from chatforge.stages.reward import load_reward_model, run_reward
from chatforge.stages.rollout import (
    AdaptiveKL,
    batched_logprobs,
    function_scores,
    load_prompt_rows,
    load_reward_function,
    model_scores,
    sample_round,
)
from chatforge.tokenizer import load_tokenizer
from conftest import REPO, learning_config


def short_reply(prompt: str, response: str, **row) -> float:
    """A reward any policy can learn quickly: 1 for a reply of at most three words."""
    return float(len(response.split()) <= 3)


def broken_reward(prompt: str, response: str, **row) -> float:
    raise KeyError("score")


def nan_reward(prompt: str, response: str, **row) -> float:
    return math.nan


def rl_config(*overrides: str):
    return learning_config(None, ["train.batch_size=32", "train.lr=3e-4", "train.min_lr=3e-4", "train.warmup_steps=0",
                              "train.weight_decay=0", "train.eval_every=1000", "train.checkpoint_every=1000",
                              "train.log_every=1", "rl.max_new_tokens=24", *overrides])


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_left_padded_batch_gives_each_row_its_own_numbers(style):
    torch.manual_seed(0)
    m = Transformer(ModelConfig(style=style, vocab_size=64, context=48, n_layer=2, n_head=4, d_model=32)).eval()
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16]]
    s = Sampling(temperature=0, max_new_tokens=10)
    batch = generate_batch(m, prompts, s, stop_ids={3}, pad_token=1)
    for p, (reply, _) in zip(prompts, batch, strict=True):
        assert reply == list(generate_ids(m, p, s, {3}))[: len(reply)] and len(reply) == 10
    width = 7
    x = torch.tensor([[1] * (width - len(p)) + p for p in prompts])
    real = x != 1
    logits = m(x, real=real)
    for i, p in enumerate(prompts):
        alone = m(torch.tensor([p]))
        assert torch.allclose(logits[i, width - len(p):], alone[0], atol=1e-5)


def test_sampled_replies_stop_at_their_end_token_and_mask_only_reply_tokens(sft_run, tasks):
    tok = load_tokenizer(sft_run[0])
    policy = load_run_model(sft_run[0])
    rows = load_prompt_rows(tasks / "prompts_heldout.jsonl", tok, 40)[:8]
    rnd = sample_round(policy, tok, rows, Sampling(max_new_tokens=24, temperature=1.0), seed=0, group_size=2)
    assert len(rnd) == 16 and rnd.rows[0] is rnd.rows[1]
    reply_tokens = rnd.mask.sum(-1)
    assert (reply_tokens >= 1).all() and (reply_tokens <= 24).all()
    im_end = tok.token_to_id("<|im_end|>")
    for i in range(len(rnd)):  # the last masked target is the end token exactly when the reply ended
        last = int(rnd.mask[i].nonzero().max()) + 1
        assert (int(rnd.sequences[i, last]) == im_end) == bool(rnd.ended[i])
    logp = batched_logprobs(policy, rnd.sequences)
    assert torch.isfinite(logp).all() and (logp <= 0).all()


def test_a_ppo_step_lowers_its_own_surrogate_loss(sft_run, tasks):
    tok = load_tokenizer(sft_run[0])
    torch.manual_seed(0)
    policy = load_run_model(sft_run[0]).train()
    from chatforge.model.classifier import Classifier

    model = ActorCritic(policy, Classifier(load_run_model(sft_run[0]), 1))
    rows = load_prompt_rows(tasks / "prompts_heldout.jsonl", tok, 40)[:8]
    rl = RLConfig(max_new_tokens=16)
    rnd = sample_round(policy, tok, rows, Sampling(temperature=1.0, max_new_tokens=16), seed=0)
    rnd.old_logp = batched_logprobs(policy, rnd.sequences)
    with torch.no_grad():
        rnd.values = model.values(rnd.sequences) * rnd.mask
    rewards = torch.randn(len(rnd))[:, None] * rnd.mask
    advantages, rnd.returns = gae(rewards, rnd.values, 1.0, 0.95)
    rnd.advantages = whiten(advantages, rnd.mask)
    idx = torch.arange(len(rnd))
    before, stats = ppo_loss(model, rnd, idx, rl)
    assert stats["clip_fraction"] == 0.0  # π = π_old at the first step: no ratio is clipped
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    before.backward()
    opt.step()
    after, _ = ppo_loss(model, rnd, idx, rl)
    assert after.item() < before.item()


def test_adaptive_kl_moves_towards_its_target_by_at_most_the_clip():
    ctl = AdaptiveKL(0.1, target=1.0, horizon=100)
    ctl.update(kl=5.0, replies=10)  # far above target: error clipped to +0.2
    assert ctl.coef == pytest.approx(0.1 * (1 + 0.2 * 10 / 100))
    ctl.update(kl=0.9, replies=10)
    assert ctl.coef < 0.1 * 1.02
    fixed = AdaptiveKL(0.1, target=0.0, horizon=100)
    fixed.update(kl=5.0, replies=10)
    assert fixed.coef == 0.1
    mask = torch.ones(2, 3)
    returns = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 5.0]])
    assert explained_variance(returns, returns, mask) == pytest.approx(1.0)
    assert explained_variance(torch.zeros_like(returns) + returns.mean(), returns, mask) == pytest.approx(0.0)



def test_kl_per_score_std_scales_beta_once_by_the_first_rounds_spread():
    ctl = AdaptiveKL(0.01, target=0.0, horizon=100, per_score_std=True)
    ctl.scale(4.0)  # first round: scores with std 4 -> β = 0.04
    ctl.scale(2.0)  # later rounds leave it
    assert ctl.coef == pytest.approx(0.04) and not ctl.unscaled
    for odd in (0.0, float("nan")):  # all rewards alike: β as given, not 0 or NaN
        flat = AdaptiveKL(0.01, target=0.0, horizon=100, per_score_std=True)
        flat.scale(odd)
        assert flat.coef == 0.01 and not flat.unscaled
    plain = AdaptiveKL(0.01, target=0.0, horizon=100)
    plain.scale(4.0)
    assert plain.coef == 0.01

def file_digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.learning
def test_grpo_raises_the_held_out_reward_and_keeps_the_reference(sft_run, tasks, tmp_path, measured):
    tok = load_tokenizer(sft_run[0])
    before_digest = file_digest(sft_run[0] / "model.safetensors")
    held = load_prompt_rows(tasks / "prompts_heldout.jsonl", tok, 40)
    held = random.Random(0).sample(held, 64)
    greedy = Sampling(temperature=0.0, max_new_tokens=24)

    def held_out_reward(run) -> float:
        rnd = sample_round(load_run_model(run), tok, held, greedy, seed=0)
        return function_scores(short_reply, "short_reply", rnd).mean().item()

    cfg = rl_config("train.steps=12", "rl.group_size=8", "rl.prompts_per_rollout=8", "rl.epochs=1",
                    "rl.reward=test_rl:short_reply", "rl.kl_coef=0.02")
    run_grpo(cfg, sft_run[0], tasks / "prompts_train.jsonl", tmp_path / "grpo")
    start, end = held_out_reward(sft_run[0]), held_out_reward(tmp_path / "grpo")
    print(f"grpo: held-out reward {start:.3f} -> {end:.3f}")
    assert measured("held_out_gain", end - start) >= 0.25
    assert file_digest(sft_run[0] / "model.safetensors") == before_digest
    log = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
    assert len(log) == 12 and all(math.isfinite(r["kl"]) and r["kl"] >= 0 for r in log)
    assert {"reward", "kl", "entropy", "clip_fraction", "reply_tokens", "end_rate"} <= set(log[-1])


@pytest.fixture(scope="module")
def reward_run(sft_run, tasks, tmp_path_factory):
    """A reward model learned from comparisons whose labeller prefers a reply of at most three words
    (`short_reply`, the gold judge here): chosen = the first two or three words of a real line, rejected = a
    whole real line (5 to 12 words). A property the policy can reach, so PPO has something true to learn."""
    out = tmp_path_factory.mktemp("runs") / "rm"
    rng = random.Random(0)

    def short_pairs(name: str) -> Path:
        pairs = [json.loads(line) for line in (tasks / name).read_text(encoding="utf-8").splitlines()[:1200]]
        path = out.parent / name
        path.write_text("".join(json.dumps({"prompt": p["prompt"], "rejected": p["rejected"],
                                            "chosen": " ".join(p["chosen"].split()[:rng.choice((2, 3))])}) + "\n"
                                for p in pairs if p["chosen"].isascii()))
        return path

    cfg = learning_config(REPO / "configs" / "demo-rm.toml", ["train.steps=40", "train.eval_every=1000",
                                                          "train.checkpoint_every=1000"])
    run_reward(cfg, sft_run[0], short_pairs("prefs_train.jsonl"), short_pairs("prefs_val.jsonl"), out)
    return out


@pytest.mark.learning
def test_ppo_against_a_learned_reward_model_raises_the_held_out_gold_score(sft_run, reward_run, tasks, tmp_path,
                                                                           measured):
    """InstructGPT step 3 in miniature: PPO optimises the reward model learned from comparisons (its critic
    starts as that reward model), never the gold judge; on held-out prompts the gold judge's score of greedy
    replies rises, and so does the reward model's, while the KL to the reference stays bounded."""
    tok = load_tokenizer(sft_run[0])
    held = random.Random(0).sample(load_prompt_rows(tasks / "prompts_heldout.jsonl", tok, 40), 64)
    (tmp_path / "held.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in held))
    cfg = rl_config("train.steps=24", "rl.prompts_per_rollout=32", "rl.epochs=2", "rl.kl_coef=0.05",
                    "train.eval_every=24", "rl.gold=test_rl:short_reply")  # the judge: logged, never optimised
    rm = load_reward_model(reward_run)

    def held_out(run) -> tuple[float, float]:
        rnd = sample_round(load_run_model(run), tok, held, Sampling(temperature=0.0, max_new_tokens=24), seed=0)
        return function_scores(short_reply, "short_reply", rnd).mean().item(), model_scores(rm, tok, rnd).mean().item()

    result = run_ppo(cfg, sft_run[0], tasks / "prompts_train.jsonl", tmp_path / "ppo", reward_run,
                     tmp_path / "held.jsonl")
    (gold_start, rm_start), (gold_end, rm_end) = held_out(sft_run[0]), held_out(tmp_path / "ppo")
    print(f"ppo: held-out gold {gold_start:.3f} -> {gold_end:.3f}, reward model {rm_start:.3f} -> {rm_end:.3f}, "
          f"KL {result['val_kl']:.3f}")
    assert measured("held_out_gold_gain", gold_end - gold_start) >= 0.5
    assert measured("held_out_rm_gain", rm_end - rm_start) > 0
    assert 0 <= measured("val_kl", result["val_kl"]) < 10.0
    log = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").open()]
    rounds = [r for r in log if "gold" in r]  # the judge's score of each round's samples, as training goes
    assert len(rounds) == 24 and rounds[-1]["gold"] > rounds[0]["gold"] and 0 < rounds[-1]["distinct_2"] <= 1
    assert {"value_loss", "explained_variance", "clip_fraction", "entropy", "kl", "reward"} <= set(log[-1])


def test_iterated_rlhf_continues_the_reward_model_and_keeps_the_kl_to_the_first_reference(
        sft_run, pretrained, reward_run, tasks, tmp_path):
    """The pieces of the demo's iterated RLHF (demo_form.py): a reward model trained further from a
    reward-model run starts from its weights (at lr 0 it scores exactly as before), and a later PPO iteration
    from another model keeps its KL penalty to the reference it is given."""
    tok = load_tokenizer(sft_run[0])
    rows = load_prompt_rows(tasks / "prompts_heldout.jsonl", tok, 40)[:16]
    rnd = sample_round(load_run_model(sft_run[0]), tok, rows, Sampling(temperature=1.0, max_new_tokens=16), seed=0)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": "Yes.", "rejected": t}) + "\n"
                             for r, t in zip(rnd.rows, rnd.texts, strict=True) if t.strip() and t != "Yes."))
    frozen = learning_config(REPO / "configs" / "form-rm-iter2.toml", ["train.steps=1", "train.lr=0", "train.min_lr=0"])
    run_reward(frozen, reward_run, pairs, pairs, tmp_path / "rm2")
    before, after = (model_scores(load_reward_model(run), tok, rnd) for run in (reward_run, tmp_path / "rm2"))
    assert torch.allclose(before, after)
    cfg = rl_config("train.steps=1", "rl.prompts_per_rollout=16")
    run_ppo(cfg, sft_run[0], tasks / "prompts_train.jsonl", tmp_path / "same", reward_run)
    run_ppo(cfg, sft_run[0], tasks / "prompts_train.jsonl", tmp_path / "other", reward_run,
            reference_run=pretrained[0])
    first_kl = [json.loads((tmp_path / run / "metrics.jsonl").open().readline())["kl"] for run in ("same", "other")]
    assert first_kl[0] == pytest.approx(0.0, abs=1e-4) and first_kl[1] > 0.5  # SFT moved far from its base


def test_bad_rewards_are_clear_errors(sft_run, tasks, tmp_path):
    tok = load_tokenizer(sft_run[0])
    rows = load_prompt_rows(tasks / "prompts_heldout.jsonl", tok, 40)[:2]
    rnd = sample_round(load_run_model(sft_run[0]), tok, rows, Sampling(temperature=1.0, max_new_tokens=8), seed=0)
    with pytest.raises(ChatforgeError, match="raised KeyError"):
        function_scores(broken_reward, "test_rl:broken_reward", rnd)
    with pytest.raises(ChatforgeError, match="finite number"):
        function_scores(nan_reward, "test_rl:nan_reward", rnd)
    for spec in ("no_colon", "no_such_module_xyz:f", "test_rl:missing"):
        with pytest.raises(ChatforgeError, match="rl.reward"):
            load_reward_function(spec)
    with pytest.raises(ChatforgeError, match="group_size"):
        run_grpo(rl_config("rl.reward=test_rl:short_reply", "rl.group_size=1"), sft_run[0],
                 tasks / "prompts_train.jsonl", tmp_path / "g")
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"question": "no prompt"}\n')
    with pytest.raises(ChatforgeError, match=r"prompts.jsonl:2"):
        load_prompt_rows(bad, tok, 40)


def test_a_reward_model_with_another_tokenizer_is_refused(sft_run, reward_run, tasks, tmp_path):
    other = tmp_path / "rm_other"
    other.mkdir()
    for f in reward_run.iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    table = json.loads((other / "tokenizer.json").read_text())
    table["model"]["vocab"]["zzzz_new"] = len(table["model"]["vocab"])
    (other / "tokenizer.json").write_text(json.dumps(table))
    with pytest.raises(ChatforgeError, match="different tokenizers"):
        run_ppo(rl_config("train.steps=1"), sft_run[0], tasks / "prompts_train.jsonl", tmp_path / "ppo", other)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path):
    from chatforge.config import Config, TrainConfig
    from chatforge.train.loop import Stage, train

    torch.manual_seed(0)
    model = Transformer(ModelConfig(style="llama", vocab_size=64, context=16, n_layer=1, n_head=2, d_model=16))
    x = torch.randint(0, 64, (4, 16))
    calls = {"n": 0}
    poisoned: set[int] = {2, 3}

    def loss(m, batch):
        calls["n"] += 1
        value = m(batch, targets=batch)
        return value * float("nan") if calls["n"] in poisoned else value

    stage = Stage(name="t", next_batch=lambda: x, loss=loss, tokens=lambda batch: batch.numel())
    cfg = TrainConfig(steps=5, max_bad_steps=2, checkpoint_every=1, log_every=1, eval_every=1000,
                      precision="fp32", warmup_steps=0)
    train(model, stage, Config(train=cfg), tmp_path / "a")
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").open()]
    assert [r["step"] for r in log if "skipped" in r] == [2, 2]  # the same step, tried three times
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert all(torch.isfinite(p).all() for p in model.parameters())

    calls["n"], poisoned = 0, set(range(3, 100))
    with pytest.raises(ChatforgeError, match="max_bad_steps=2"):
        train(model, stage, Config(train=cfg), tmp_path / "b")
    assert (tmp_path / "b" / "checkpoints" / "step_2").is_dir()  # the last good checkpoint is kept


def test_ppo_ptx_mixes_the_pretraining_loss(sft_run, data_dir, tasks, tmp_path):
    cfg = rl_config("train.steps=2", "rl.prompts_per_rollout=16", "rl.epochs=1", "rl.ptx_coef=0.1",
                    "rl.reward=test_rl:short_reply", f"data.dir={data_dir}")
    run_ppo(cfg, sft_run[0], tasks / "prompts_train.jsonl", tmp_path / "ppo")
    log = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").open()]
    assert all(0 < r["ptx_loss"] < 10 for r in log)


def test_grpo_resumes_from_its_checkpoint_and_refuses_to_overwrite(sft_run, tasks, tmp_path):
    args = ["rl.group_size=4", "rl.prompts_per_rollout=4", "rl.epochs=1", "train.batch_size=16",
            "rl.reward=test_rl:short_reply", "rl.kl_target=1.0", "rl.kl_horizon=100", "train.checkpoint_every=2"]
    out = tmp_path / "grpo"
    first = run_grpo(rl_config("train.steps=2", *args), sft_run[0], tasks / "prompts_train.jsonl", out)
    with pytest.raises(ChatforgeError, match="already here"):
        run_grpo(rl_config("train.steps=2", *args), sft_run[0], tasks / "prompts_train.jsonl", out)
    run_grpo(rl_config("train.steps=4", *args), sft_run[0], tasks / "prompts_train.jsonl", out, resume="latest")
    log = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[2]["kl_coef"] == pytest.approx(first["kl_coef"])  # the adaptive β carried over the restart
    assert (out / "checkpoints" / "step_4").is_dir()
