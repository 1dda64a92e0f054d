import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from chatforge.config import load_config
from chatforge.model.generate import Sampling, generate_ids, sample_tokens
from chatforge.model.transformer import KVCache, ModelConfig, StaticKVCache, Transformer
from conftest import REPO


def build_on_meta(cfg: ModelConfig) -> Transformer:
    with torch.device("meta"):  # shapes only: no memory, no init time
        return Transformer(cfg)


def test_gpt2_small_has_exactly_124_439_808_parameters():
    cfg = load_config(REPO / "configs" / "gpt2-124m.toml").model
    assert build_on_meta(cfg).num_params() == 124_439_808


def test_llama_preset_is_gpt2_small_sized():
    model = build_on_meta(load_config(REPO / "configs" / "llama-124m.toml").model)
    assert abs(model.num_params() - 124_439_808) / 124_439_808 < 0.05
    assert model.blocks[0].attn.n_kv_head == 4 and model.pos_emb is None


def small(style: str) -> Transformer:
    torch.manual_seed(0)
    kv = 2 if style == "llama" else 0
    cfg = ModelConfig(style=style, vocab_size=97, context=48, n_layer=2, n_head=4, n_kv_head=kv, d_model=32,
                      bias=style == "gpt2")
    return Transformer(cfg).eval()


def test_kv_cache_logits_equal_full_forward():
    for style in ("gpt2", "llama"):
        model = small(style)
        ids = torch.randint(0, 97, (2, 20))
        full = model(ids)
        cache = KVCache(model.cfg.n_layer)
        pieces = [model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
        assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5), style


def test_static_cache_logits_equal_full_forward():
    """The preallocated cache (what the compiled decode uses) computes the same function."""
    for style in ("gpt2", "llama"):
        model = small(style)
        ids = torch.randint(0, 97, (2, 20))
        cache = StaticKVCache(model.cfg, 2, torch.device("cpu"))
        pieces = [model(ids[:, :7], cache=cache), model(ids[:, 7:12], cache=cache)]  # a second prefill chunk too
        pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
        assert torch.allclose(torch.cat(pieces, dim=1), model(ids), atol=1e-5), style
        assert int(cache.position) == 20


def test_compiled_decode_gives_the_eager_tokens():
    model = small("llama")
    names = set(model.state_dict())
    greedy = Sampling(temperature=0, max_new_tokens=40)
    eager = list(generate_ids(model, [5, 17, 42], greedy))
    assert list(generate_ids(model, [5, 17, 42], greedy, compile=True)) == eager and len(eager) == 40
    assert list(generate_ids(model, [9, 3], greedy, compile=True)) == list(generate_ids(model, [9, 3], greedy))
    assert set(model.state_dict()) == names  # the compiled step is kept beside the model, not inside it
    with pytest.raises(ValueError):
        list(generate_ids(model, [5], greedy, use_cache=False, compile=True))


def test_greedy_generation_with_cache_equals_without():
    for style in ("gpt2", "llama"):
        model = small(style)
        greedy = Sampling(temperature=0, max_new_tokens=30)
        with_cache = list(generate_ids(model, [5, 17, 42], greedy, use_cache=True))
        without = list(generate_ids(model, [5, 17, 42], greedy, use_cache=False))
        assert len(with_cache) == 30 and with_cache == without, style


def test_sample_tokens_draws_each_kept_token_in_proportion():
    """Inverse-CDF sampling over an even grid of uniforms: each kept token's share is its probability
    renormalised over what top-k / top-p keep, whether the nucleus fits the shortlist or needs a full sort."""
    probs = torch.tensor([0.05, 0.5, 0.1, 0.2, 0.15])  # not in order: the sampler must rank them
    n = 2000
    logits = probs.log().expand(n, 5)
    uniform = (torch.arange(n) + 0.5) / n

    def shares(temperature=1.0, top_k=0, top_p=1.0, shortlist=256):
        rows = lambda v, dtype: torch.full((n,), v, dtype=dtype)  # noqa: E731
        tokens = sample_tokens(logits, rows(temperature, torch.float32), rows(top_k, torch.long),
                               rows(top_p, torch.float32), uniform, shortlist)
        return torch.bincount(tokens, minlength=5).float() / n

    assert torch.allclose(shares(), probs, atol=1e-3)
    nucleus = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.15]) / 0.85  # top-p 0.75: the smallest set holding 0.75
    assert torch.allclose(shares(top_p=0.75), nucleus, atol=1e-3)
    assert torch.allclose(shares(top_p=0.75, shortlist=2), nucleus, atol=1e-3)  # wider than the shortlist
    assert torch.allclose(shares(top_k=2), torch.tensor([0.0, 0.5, 0.0, 0.2, 0.0]) / 0.7, atol=1e-3)
    assert torch.equal(shares(temperature=0.0), torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]))


def test_top_k_one_and_tiny_top_p_are_greedy():
    model = small("llama")
    greedy = list(generate_ids(model, [1, 2, 3], Sampling(temperature=0, max_new_tokens=15)))
    assert list(generate_ids(model, [1, 2, 3], Sampling(temperature=1.0, top_k=1, max_new_tokens=15, seed=3))) == greedy
    assert list(generate_ids(model, [1, 2, 3], Sampling(temperature=1.0, top_p=1e-6, max_new_tokens=15, seed=3))) \
        == greedy


def test_generation_stops_at_stop_id_and_at_context():
    model = small("gpt2")
    first = list(generate_ids(model, [1, 2, 3], Sampling(temperature=0, max_new_tokens=20)))
    k = next((i for i, t in enumerate(first) if t not in first[:i] and i > 0), 0)  # a token's first appearance
    stopped = list(generate_ids(model, [1, 2, 3], Sampling(temperature=0, max_new_tokens=20), stop_ids={first[k]}))
    assert stopped == first[:k]
    assert len(list(generate_ids(model, list(range(40)), Sampling(temperature=0, max_new_tokens=100)))) == 24


def test_flops_per_token_matches_a_count_of_a_training_step():
    """flops_per_token (6N + attention) against torch's own count of one forward and backward pass over
    full-context sequences, attention as plain matmuls (the math backend, so the counter sees it). 6N also
    counts the 1-D parameters (norms, biases) as if they were matmul weights: that is the whole gap."""
    for style in ("gpt2", "llama"):
        model = small(style).train()
        ids = torch.randint(0, 97, (2, model.cfg.context))
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(ids, targets=ids).backward()
        vectors = sum(p.numel() for p in model.parameters() if p.dim() == 1)
        assert counter.get_total_flops() + 6 * vectors * ids.numel() == model.flops_per_token() * ids.numel(), style
