"""Hugging Face interop: models built locally from configs with random weights (nothing from a hub),
both directions, logits and greedy generation equal to transformers'."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

from chatforge.errors import ChatforgeError  # noqa: E402
from chatforge.interop.hf import export_hf, import_hf  # noqa: E402
from chatforge.model.generate import Sampling, generate_ids  # noqa: E402
from chatforge.model.io import load_run_model, save_model_files  # noqa: E402
from chatforge.model.moe import MoEConfig  # noqa: E402
from chatforge.model.transformer import ModelConfig, Transformer  # noqa: E402
from chatforge.tokenizer import copy_tokenizer, encode, load_tokenizer, render_chat  # noqa: E402

VOCAB = 1024  # the session tokenizer's size


def hf_model(family: str):
    common = {"vocab_size": VOCAB, "eos_token_id": None, "bos_token_id": None, "pad_token_id": None}
    llama_like = {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 96, "rms_norm_eps": 1e-6,
                  "rope_theta": 5000.0, "tie_word_embeddings": False, **common}
    configs = {
        "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=96, **common),
        "llama": lambda: transformers.LlamaConfig(**llama_like),
        "mistral": lambda: transformers.MistralConfig(**llama_like, sliding_window=None),
        "mixtral": lambda: transformers.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2,
                                                      sliding_window=None),
        "mixtral-fused": lambda: transformers.MixtralConfig(**llama_like, num_local_experts=4, num_experts_per_tok=2,
                                                            sliding_window=None),
        "qwen2": lambda: transformers.Qwen2Config(**{**llama_like, "tie_word_embeddings": True}),
        "llama-linear": lambda: transformers.LlamaConfig(**llama_like,
                                                         rope_scaling={"rope_type": "linear", "factor": 3.0}),
        "llama3": lambda: transformers.LlamaConfig(**llama_like, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
    }
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(configs[family]()).eval()
    with torch.no_grad():  # random biases too, so a dropped or misplaced bias shows
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def greedy_hf(model, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "llama-linear", "llama3", "mixtral",
                                    "mixtral-fused"])
def test_import_matches_transformers(family, tokenizer_dir, tmp_path):
    theirs = hf_model(family)
    src = tmp_path / "hf"
    theirs.save_pretrained(src, safe_serialization=True, max_shard_size="200KB" if family == "mistral" else "5GB",
                           save_original_format=family != "mixtral-fused")  # the fused experts transformers 5 holds
    assert (src / "model.safetensors.index.json").is_file() == (family == "mistral")  # sharded, or not
    if family.startswith("mixtral"):
        names = set(load_file(src / "model.safetensors"))
        fused = family == "mixtral-fused"
        assert ("model.layers.1.mlp.experts.gate_up_proj" in names) == fused
        assert ("model.layers.1.block_sparse_moe.experts.3.w1.weight" in names) != fused  # the hub's names
    copy_tokenizer(tokenizer_dir, src)
    import_hf(src, tmp_path / "run")
    ours = load_run_model(tmp_path / "run")
    x = torch.randint(0, VOCAB, (3, 40))
    with torch.no_grad():
        assert torch.allclose(ours(x), theirs(x).logits, atol=1e-4)
    prompt = x[0, :8].tolist()
    assert list(generate_ids(ours, prompt, Sampling(temperature=0, max_new_tokens=32))) == greedy_hf(theirs, prompt, 32)
    assert load_tokenizer(tmp_path / "run").get_vocab_size() == VOCAB


@pytest.mark.parametrize("style", ["gpt2", "llama", "qwen2", "mixtral"])
def test_export_loads_in_transformers_with_the_same_logits_and_chat_ids(style, tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    qwen2 = style == "qwen2"  # Llama style with q/k/v biases and tied embeddings
    moe = MoEConfig(n_experts=4, top_k=2, d_expert=96) if style == "mixtral" else MoEConfig()
    cfg = ModelConfig(style="gpt2" if style == "gpt2" else "llama", vocab_size=VOCAB, context=64, n_layer=2,
                      n_head=4, d_model=64, n_kv_head=0 if style == "gpt2" else 2, bias=style == "gpt2",
                      qkv_bias=qwen2, tie_embeddings=style in ("gpt2", "qwen2"), moe=moe)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    save_model_files(model, tmp_path / "run")
    copy_tokenizer(tokenizer_dir, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        assert torch.allclose(model(x), theirs(x).logits, atol=1e-4)
    prompt = x[0, :8].tolist()
    greedy = Sampling(temperature=0, max_new_tokens=32)
    assert list(generate_ids(model, prompt, greedy)) == greedy_hf(theirs, prompt, 32)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "床前明月光 and Romeo"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == encode(load_tokenizer(tmp_path / "run"), render_chat(messages, add_generation_prompt=True))
    if style == "mixtral":
        table = json.loads((tmp_path / "hf" / "config.json").read_text())
        assert (table["model_type"], table["num_local_experts"], table["num_experts_per_tok"],
                table["intermediate_size"]) == ("mixtral", 4, 2, 96)
        assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in load_file(tmp_path / "hf" / "model.safetensors")


@pytest.mark.parametrize("moe", [MoEConfig(n_experts=4, top_k=2, every=2), MoEConfig(n_experts=4, top_k=1),
                                 MoEConfig(n_experts=4, top_k=2, shared_expert=True)])
def test_an_moe_model_mixtral_cannot_represent_is_refused_on_export(moe, tokenizer_dir, tmp_path):
    cfg = ModelConfig(style="llama", vocab_size=VOCAB, context=64, n_layer=2, n_head=4, d_model=64, bias=False,
                      moe=moe)
    save_model_files(Transformer(cfg), tmp_path / "run")
    copy_tokenizer(tokenizer_dir, tmp_path / "run")
    with pytest.raises(ChatforgeError, match=r"exports only as Mixtral, which needs .*every block sparse.*top_k >= 2"):
        export_hf(tmp_path / "run", tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not (tmp_path / "hf.partial").exists()


def test_bad_folders_are_clear_errors_and_leave_no_run(tokenizer_dir, tmp_path):
    theirs = hf_model("llama")
    src = tmp_path / "hf"
    theirs.save_pretrained(src, safe_serialization=True)
    copy_tokenizer(tokenizer_dir, src)
    with pytest.raises(ChatforgeError, match="no config.json"):
        import_hf(tmp_path / "nothing", tmp_path / "r0")
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    table = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**table, "architectures": ["FalconForCausalLM"]}))
    with pytest.raises(ChatforgeError, match="supported: GPT2LMHeadModel, LlamaForCausalLM"):
        import_hf(bad, tmp_path / "r1")
    mistral = {**table, "architectures": ["MistralForCausalLM"], "sliding_window": 16}
    (bad / "config.json").write_text(json.dumps(mistral))
    with pytest.raises(ChatforgeError, match="sliding-window attention"):
        import_hf(bad, tmp_path / "r1")
    mixtral = {**table, "architectures": ["MixtralForCausalLM"], "num_local_experts": 4, "num_experts_per_tok": 1}
    (bad / "config.json").write_text(json.dumps(mixtral))
    with pytest.raises(ChatforgeError, match="Mixtral with one expert per token is not supported"):
        import_hf(bad, tmp_path / "r1")
    (bad / "config.json").write_text(json.dumps({**table, "num_hidden_layers": 3}))
    with pytest.raises(ChatforgeError, match=r"missing \['model.layers.2"):
        import_hf(bad, tmp_path / "r2")
    (bad / "config.json").write_text(json.dumps({**table, "vocab_size": 512}))
    with pytest.raises(ChatforgeError, match="wrong shape"):
        import_hf(bad, tmp_path / "r3")
    (bad / "config.json").write_text(json.dumps(table))
    tok_table = json.loads((bad / "tokenizer.json").read_text())
    tok_table["added_tokens"].append({**tok_table["added_tokens"][0], "id": 5000, "content": "<|extra|>"})
    (bad / "tokenizer.json").write_text(json.dumps(tok_table))
    with pytest.raises(ChatforgeError, match=r"ids reach \d+ but the model has only 1024 embeddings"):
        import_hf(bad, tmp_path / "r4")
    assert not any((tmp_path / f"r{i}").exists() or (tmp_path / f"r{i}.partial").exists() for i in range(5))


def test_an_imported_tokenizer_without_chat_tokens_is_made_ready_for_sft(tasks, tmp_path):
    """A Llama folder whose tokenizer knows no ChatML tokens: import adds them, grows the embedding by
    their rows (old logits unchanged), and SFT runs on the imported model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from chatforge.config import load_config
    from chatforge.stages.sft import run_sft

    foreign = Tokenizer(models.BPE())
    foreign.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    foreign.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    foreign.train_from_iterator(["Write a line that begins with the word", "床前明月光"] * 50, trainer)
    n = foreign.get_vocab_size()
    config = transformers.LlamaConfig(vocab_size=n, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)
    torch.manual_seed(0)
    theirs = transformers.AutoModelForCausalLM.from_config(config).eval()
    src = tmp_path / "hf"
    theirs.save_pretrained(src, safe_serialization=True)
    foreign.save(str(src / "tokenizer.json"))
    cfg = import_hf(src, tmp_path / "run")
    assert cfg.vocab_size == n + 4
    ours = load_run_model(tmp_path / "run")
    x = torch.randint(0, n, (2, 20))
    with torch.no_grad():
        assert torch.allclose(ours(x)[..., :n], theirs(x).logits, atol=1e-4)
    tok = load_tokenizer(tmp_path / "run")
    assert tok.token_to_id("<|im_start|>") >= n and tok.token_to_id("<|pad|>") is not None
    sft = load_config(None, ["train.steps=3", "train.batch_size=4", "train.eval_every=1000",
                             "train.checkpoint_every=1000", "train.warmup_steps=0"])
    run_sft(sft, tmp_path / "run", tasks / "sft_train.jsonl", tmp_path / "sft")
    assert load_run_model(tmp_path / "sft").cfg.vocab_size == n + 4


def test_a_lora_run_is_merged_on_export(tokenizer_dir, tmp_path):
    from chatforge.model.lora import LoRAConfig, apply_lora, save_adapter

    torch.manual_seed(0)
    base = Transformer(ModelConfig(style="llama", vocab_size=VOCAB, context=64, n_layer=2, n_head=4, d_model=64,
                                   n_kv_head=2, bias=False)).eval()
    save_model_files(base, tmp_path / "base")
    copy_tokenizer(tokenizer_dir, tmp_path / "base")
    lora = LoRAConfig(r=4, alpha=8.0, targets="q,k,v,o,up")
    apply_lora(base, lora)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora" in name:
                p.normal_(0, 0.05)  # adapters that change the function
    save_adapter(base, lora, tmp_path / "lora", str(tmp_path / "base"))
    copy_tokenizer(tokenizer_dir, tmp_path / "lora")
    export_hf(tmp_path / "lora", tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        ours = load_run_model(tmp_path / "lora")(x)
        assert torch.allclose(ours, theirs(x).logits, atol=1e-4)
        assert not torch.allclose(ours, load_run_model(tmp_path / "base")(x), atol=1e-2)  # the adapters mattered
