"""Hugging Face `transformers` folders in and out: GPT-2, Llama-family and Mixtral checkpoints (config.json +
safetensors), written and read with plain JSON and safetensors — transformers itself is not needed.

The two layouts differ from ours only in names and packing: we keep q, k and v in one fused matrix
(`attn.qkv`, rows [q; k; v]); transformers' Llama keeps three, GPT-2 one fused `c_attn` stored transposed
(its `Conv1D` computes x @ W). Our RoPE uses the same rotate-half layout as transformers' Llama, so q and
k need no permutation. Mixtral's experts are written under the hub's per-expert names
(`block_sparse_moe.experts.{j}.w1/w3/w2`, what transformers 5's save_pretrained writes too; it fuses them
into `mlp.experts.gate_up_proj` and `down_proj` only in memory, and import reads that form as well).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from chatforge.errors import ChatforgeError
from chatforge.model.io import load_run_model, save_model_files
from chatforge.model.moe import MoEConfig
from chatforge.model.transformer import ModelConfig, Transformer
from chatforge.tokenizer import EOT, IM_END, PAD, SPECIAL_TOKENS, copy_tokenizer, load_tokenizer, save_tokenizer

SUPPORTED = ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM", "Qwen2ForCausalLM")


def hf_config(cfg: ModelConfig, tok) -> dict:
    ids = {"eos_token_id": tok.token_to_id(IM_END), "pad_token_id": tok.token_to_id(PAD),
           "bos_token_id": tok.token_to_id(EOT)}
    moe = cfg.moe
    if moe.n_experts and (cfg.style == "gpt2" or moe.every != 1 or moe.top_k < 2 or moe.shared_expert
                          or cfg.bias or cfg.qkv_bias):
        raise ChatforgeError("export: a mixture-of-experts model exports only as Mixtral, which needs the Llama "
                             "style, every block sparse (model.moe.every=1), top_k >= 2 (its top-1 weight is 1, "
                             "ours the router probability), no shared expert and no biases; got "
                             f"style={cfg.style}, every={moe.every}, top_k={moe.top_k}, "
                             f"shared_expert={moe.shared_expert}, bias={cfg.bias}, qkv_bias={cfg.qkv_bias}")
    if cfg.style == "gpt2":
        if not cfg.bias or cfg.kv_heads != cfg.n_head:
            raise ChatforgeError("export: a GPT-2 style model needs model.bias=true and plain multi-head attention")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_positions": cfg.context, "n_embd": cfg.d_model, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
                "n_inner": cfg.ffn_dim, "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm_eps,
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "tie_word_embeddings": cfg.tie_embeddings, **ids}
    if cfg.bias:
        raise ChatforgeError("export: a Llama style model with biases has no transformers equivalent")
    arch, kind = ("Qwen2ForCausalLM", "qwen2") if cfg.qkv_bias else ("LlamaForCausalLM", "llama")
    experts = {}
    if moe.n_experts:
        arch, kind = "MixtralForCausalLM", "mixtral"
        experts = {"intermediate_size": moe.d_expert or cfg.ffn_dim, "num_local_experts": moe.n_experts,
                   "num_experts_per_tok": moe.top_k, "router_aux_loss_coef": moe.aux_coef,
                   "router_jitter_noise": 0.0, "sliding_window": None}
    rope: dict = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope["factor"] = cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        rope |= {"low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                 "original_max_position_embeddings": cfg.rope_original_context}
    return {"architectures": [arch], "model_type": kind, "vocab_size": cfg.vocab_size,
            "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
            "head_dim": cfg.d_model // cfg.n_head, "max_position_embeddings": cfg.context,
            "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_parameters": rope, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings, **ids,
            **experts}


def name_map(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(our name, transformers' name, stored transposed?) for every tensor but Llama's q/k/v, which we fuse."""
    pairs: list[tuple[str, str, bool]] = []
    if cfg.style == "gpt2":
        pairs += [("tok_emb.weight", "transformer.wte.weight", False),
                  ("pos_emb.weight", "transformer.wpe.weight", False),
                  ("norm.weight", "transformer.ln_f.weight", False), ("norm.bias", "transformer.ln_f.bias", False)]
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
            for a, b in (("norm1", "ln_1"), ("norm2", "ln_2")):
                pairs += [(f"{ours}{a}.{x}", f"{theirs}{b}.{x}", False) for x in ("weight", "bias")]
            for a, b in (("attn.qkv", "attn.c_attn"), ("attn.proj", "attn.c_proj"), ("mlp.up", "mlp.c_fc"),
                         ("mlp.down", "mlp.c_proj")):  # GPT-2's Conv1D stores (in, out)
                pairs += [(f"{ours}{a}.weight", f"{theirs}{b}.weight", True),
                          (f"{ours}{a}.bias", f"{theirs}{b}.bias", False)]
    else:
        pairs += [("tok_emb.weight", "model.embed_tokens.weight", False), ("norm.weight", "model.norm.weight", False)]
        for i in range(cfg.n_layer):
            ours, theirs = f"blocks.{i}.", f"model.layers.{i}."
            pairs += [(f"{ours}attn.proj.weight", f"{theirs}self_attn.o_proj.weight", False),
                      (f"{ours}norm1.weight", f"{theirs}input_layernorm.weight", False),
                      (f"{ours}norm2.weight", f"{theirs}post_attention_layernorm.weight", False)]
            if cfg.moe.sparse(i):  # Mixtral: w1 the gate, w3 the up, w2 the down projection
                moe = f"{theirs}block_sparse_moe."
                pairs.append((f"{ours}mlp.router.weight", f"{moe}gate.weight", False))
                pairs += [(f"{ours}mlp.experts.{j}.{a}.weight", f"{moe}experts.{j}.{w}.weight", False)
                          for j in range(cfg.moe.n_experts) for a, w in (("gate", "w1"), ("up", "w3"), ("down", "w2"))]
            else:
                pairs += [(f"{ours}mlp.{a}.weight", f"{theirs}mlp.{a}_proj.weight", False)
                          for a in ("up", "gate", "down")]
    if not cfg.tie_embeddings:
        pairs.append(("lm_head.weight", "lm_head.weight", False))
    return pairs


def qkv_parts(cfg: ModelConfig) -> list[int]:
    kv_rows = cfg.kv_heads * (cfg.d_model // cfg.n_head)
    return [cfg.d_model, kv_rows, kv_rows]


def to_hf_tensors(model: Transformer) -> dict[str, torch.Tensor]:
    cfg, sd = model.cfg, model.state_dict()
    out = {theirs: sd[ours].t() if transposed else sd[ours] for ours, theirs, transposed in name_map(cfg)}
    if cfg.style == "llama":
        for i in range(cfg.n_layer):
            kinds = ("weight", "bias") if cfg.qkv_bias else ("weight",)
            for kind in kinds:
                for x, part in zip("qkv", sd[f"blocks.{i}.attn.qkv.{kind}"].split(qkv_parts(cfg)), strict=True):
                    out[f"model.layers.{i}.self_attn.{x}_proj.{kind}"] = part
    return {k: v.detach().contiguous().clone() for k, v in out.items()}


def export_hf(run: str | Path, out: str | Path) -> dict:
    """A folder `transformers.AutoModelForCausalLM/AutoTokenizer.from_pretrained` load with no custom code.
    A LoRA run is merged first."""
    from chatforge.model.lora import merge_lora

    run, out = Path(run), Path(out)
    model = load_run_model(run)
    if (run / "adapter.json").is_file():
        model = merge_lora(model)
    tok = load_tokenizer(run)
    config = hf_config(model.cfg, tok)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(to_hf_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": "float32"}, indent=2) + "\n")
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    copy_tokenizer(run, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # no half-written export is ever left under the real name
    return config


def read_hf_config(src: Path) -> tuple[ModelConfig, dict]:
    path = src / "config.json"
    if not path.is_file():
        raise ChatforgeError(f"{path}: no config.json; point at a transformers model folder")
    table = json.loads(path.read_text())
    arch = (table.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED:
        raise ChatforgeError(f"{path}: architecture {arch} is not supported; supported: {', '.join(SUPPORTED)}")
    if arch == "GPT2LMHeadModel":
        if table.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ChatforgeError(f"{path}: GPT-2 activation {table['activation_function']} is not supported")
        n_embd = table["n_embd"]
        cfg = ModelConfig(style="gpt2", vocab_size=table["vocab_size"], context=table["n_positions"],
                          n_layer=table["n_layer"], n_head=table["n_head"], d_model=n_embd,
                          d_ff=table.get("n_inner") or 4 * n_embd, bias=True,
                          tie_embeddings=table.get("tie_word_embeddings", True),
                          norm_eps=table.get("layer_norm_epsilon", 1e-5))
        return cfg, table
    rope = table.get("rope_parameters") or table.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type")) or "default"
    if rope_type not in ("default", "linear", "llama3"):
        raise ChatforgeError(f"{path}: RoPE scaling '{rope_type}' is not supported (default, linear, llama3 are)")
    scaling = {} if rope_type == "default" else {"rope_scaling": rope_type, "rope_factor": float(rope["factor"])}
    if rope_type == "llama3":
        scaling |= {"rope_low_freq_factor": float(rope["low_freq_factor"]),
                    "rope_high_freq_factor": float(rope["high_freq_factor"]),
                    "rope_original_context": int(rope["original_max_position_embeddings"])}
    head_dim = table.get("head_dim") or table["hidden_size"] // table["num_attention_heads"]
    if head_dim * table["num_attention_heads"] != table["hidden_size"]:
        raise ChatforgeError(f"{path}: head_dim × heads must equal hidden_size for chatforge's attention")
    moe = {}
    if arch == "MixtralForCausalLM":
        if table["num_experts_per_tok"] < 2:
            raise ChatforgeError(f"{path}: Mixtral with one expert per token is not supported (its weight is 1, "
                                 "chatforge's top-1 weight is the router probability)")
        moe = {"moe": MoEConfig(n_experts=table["num_local_experts"], top_k=table["num_experts_per_tok"], every=1,
                                d_expert=table["intermediate_size"],
                                aux_coef=float(table.get("router_aux_loss_coef", 0.001)))}
    window = table.get("sliding_window") if arch != "Qwen2ForCausalLM" or table.get("use_sliding_window") else None
    if window and window < table["max_position_embeddings"]:
        raise ChatforgeError(f"{path}: sliding-window attention ({window} of {table['max_position_embeddings']} "
                             "positions) is not supported")
    theta = rope.get("rope_theta", table.get("rope_theta", 10000.0))
    cfg = ModelConfig(style="llama", vocab_size=table["vocab_size"], context=table["max_position_embeddings"],
                      n_layer=table["num_hidden_layers"], n_head=table["num_attention_heads"],
                      n_kv_head=table.get("num_key_value_heads") or table["num_attention_heads"],
                      d_model=table["hidden_size"], d_ff=table["intermediate_size"], bias=False,
                      qkv_bias=arch == "Qwen2ForCausalLM" or bool(table.get("attention_bias")),
                      tie_embeddings=table.get("tie_word_embeddings", False), rope_theta=float(theta),
                      norm_eps=table.get("rms_norm_eps", 1e-6), **scaling, **moe)
    return cfg, table


def read_hf_tensors(src: Path) -> dict[str, torch.Tensor]:
    index = src / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.is_file():  # sharded: the index names each tensor's file
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        if not (src / name).is_file():
            raise ChatforgeError(f"{src / name}: weights file not found (only safetensors are read, never pickle)")
        tensors.update(load_file(str(src / name)))
    return tensors


def from_hf_tensors(cfg: ModelConfig, tensors: dict[str, torch.Tensor], src: Path) -> dict[str, torch.Tensor]:
    """Our state dict from transformers' names; a missing tensor is a clear error naming it."""
    if cfg.moe.n_experts:
        tensors = unfuse_experts(tensors)
    want = {k: v.shape for k, v in to_hf_tensors(Transformer(cfg)).items()}
    missing = sorted(set(want) - set(tensors))
    extra = sorted(k for k in set(tensors) - set(want) if not k.endswith((".attn.bias", ".attn.masked_bias",
                                                                              "rotary_emb.inv_freq")))
    if cfg.tie_embeddings and "lm_head.weight" in extra:
        extra.remove("lm_head.weight")
    wrong = sorted(k for k in want if k in tensors and tuple(tensors[k].shape) != tuple(want[k]))
    if missing or extra or wrong:
        raise ChatforgeError(f"{src}: tensors do not match config.json: missing {missing[:8]}, unexpected "
                             f"{extra[:8]}, wrong shape {wrong[:8]}")
    t = {k: v.float() for k, v in tensors.items()}
    sd = {ours: t[theirs].t() if transposed else t[theirs] for ours, theirs, transposed in name_map(cfg)}
    if cfg.style == "llama":
        for i in range(cfg.n_layer):
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                sd[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat(
                    [t[f"model.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"])
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["tok_emb.weight"]
    return sd


def unfuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Mixtral's hub names from the fused form transformers 5 holds in memory (and writes with
    `save_pretrained(save_original_format=False)`): `mlp.gate.weight` (the router), `mlp.experts.gate_up_proj`
    (experts, [gate; up] rows, d_model) and `mlp.experts.down_proj` (experts, d_model, hidden)."""
    out = {}
    for name, t in tensors.items():
        layer, _, rest = name.partition(".mlp.")
        moe = f"{layer}.block_sparse_moe."
        if rest == "gate.weight":
            out[f"{moe}gate.weight"] = t
        elif rest == "experts.gate_up_proj":
            for j, (gate, up) in enumerate(e.chunk(2) for e in t):
                out[f"{moe}experts.{j}.w1.weight"], out[f"{moe}experts.{j}.w3.weight"] = gate, up
        elif rest == "experts.down_proj":
            out |= {f"{moe}experts.{j}.w2.weight": e for j, e in enumerate(t)}
        else:
            out[name] = t
    return out


def import_hf(src: str | Path, out: str | Path) -> ModelConfig:
    """A transformers folder (GPT-2, Llama, Mistral, Mixtral, Qwen2) as a chatforge run folder, tokenizer included."""
    src, out = Path(src), Path(out)
    cfg, _ = read_hf_config(src)
    sd = from_hf_tensors(cfg, read_hf_tensors(src), src)
    if not (src / "tokenizer.json").is_file():
        raise ChatforgeError(f"{src / 'tokenizer.json'}: no fast tokenizer here; chatforge needs tokenizer.json")
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))  # not load_tokenizer: it may lack our tokens yet
    top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
    if top < 0 or top >= cfg.vocab_size:  # the embedding may be padded beyond the vocabulary, not short of it
        raise ChatforgeError(f"{src}: the tokenizer's ids reach {top} but the model has only "
                             f"{cfg.vocab_size} embeddings")
    model = Transformer(cfg)
    model.load_state_dict(sd)
    added = chat_ready(tok)
    model = grow_vocabulary(model, 1 + max(tok.get_vocab(with_added_tokens=True).values()))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_files(model, tmp, {"stage": "imported", "from": str(src), "added_tokens": added})
    save_tokenizer(tok, tmp)  # with chatforge's ChatML template and special tokens
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return model.cfg


def chat_ready(tok) -> list[str]:
    """Add the ChatML special tokens chatforge's chat stages use and a foreign tokenizer lacks (Llama's,
    GPT-2's); returns the ones added."""
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        tok.add_special_tokens(missing)
    return missing


def grow_vocabulary(model: Transformer, n_tokens: int) -> Transformer:
    """A model with at least `n_tokens` embedding and output rows: the old rows are kept, so logits of the
    old tokens do not change; new rows start at the mean of the old ones, to be learnt in fine-tuning."""
    if n_tokens <= model.cfg.vocab_size:
        return model
    old = model.cfg.vocab_size
    grown = Transformer(ModelConfig(**{**model.cfg.__dict__, "vocab_size": n_tokens}))
    sd = model.state_dict()
    for name in ("tok_emb.weight", "lm_head.weight"):
        sd[name] = torch.cat([sd[name], sd[name].mean(0, keepdim=True).expand(n_tokens - old, -1)])
    grown.load_state_dict(sd)
    return grown
