"""Weight-only int8 for decoding: the int8 layer computes (x Qᵀ) ⊙ s exactly, each weight is within half a
step of the original, the quantized model's greedy tokens on held-out text mostly agree with fp32's, and the
CLI runs it (the serving engine: tests/test_serve.py)."""


import pytest
import torch

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.model.generate import Sampling, generate_ids
from chatforge.model.io import load_run_model
from chatforge.model.quantize import Int8Linear, for_inference, quantize_int8


def test_int8_linear_is_the_scaled_int8_product_and_close_to_the_original():
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40)
    q = Int8Linear(linear, torch.float32)
    w, s = q.weight_int8.float(), q.scale
    assert q.weight_int8.dtype == torch.int8 and w.abs().max() == 127
    assert ((w * s[:, None] - linear.weight).abs() <= s[:, None] / 2 + 1e-7).all()  # within half a step
    x = torch.randn(3, 5, 96)
    exact = x @ (w * s[:, None]).T + linear.bias
    assert torch.allclose(q(x), exact, atol=1e-4) and q(x).shape == (3, 5, 40)
    assert (q(x) - linear(x)).abs().max() < 0.05 * linear(x).abs().max()


@pytest.mark.learning
def test_quantized_model_agrees_with_fp32_on_held_out_text(pretrained, data_dir, measured):
    from chatforge.data.shards import open_tokens

    model = load_run_model(pretrained[0])
    q = quantize_int8(model)
    assert all(not isinstance(m, torch.nn.Linear) for m in q.modules())  # every matmul in int8
    assert next(model.parameters()).dtype == torch.float32  # the original is untouched
    val = torch.from_numpy(open_tokens(data_dir, "val")[:8 * 64].astype("int64")).view(8, 64)
    with torch.no_grad():
        full, quant = model(val).float(), q(val).float()
    agree = (full.argmax(-1) == quant.argmax(-1)).float().mean().item()
    assert measured("argmax_agreement", agree) > 0.9  # the next-token choice on held-out text
    loss = lambda logits: torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)),
                                                            val[:, 1:].reshape(-1)).item()
    assert measured("relative_loss_change", abs(loss(quant) - loss(full)) / loss(full)) < 0.02
    greedy = Sampling(temperature=0, max_new_tokens=24)
    prompt = val[0, :16].tolist()
    same = sum(a == b for a, b in zip(generate_ids(model, prompt, greedy), generate_ids(q, prompt, greedy),
                                      strict=False))
    assert same >= 12  # greedy decoding follows the same path for (at least) the first half


def test_int8_from_the_command_line(pretrained, capsys, monkeypatch):
    """`generate --dtype int8` decodes with the int8 model: what it prints is the prompt and that model's
    greedy continuation, token for token."""
    from chatforge.model import generate
    from chatforge.tokenizer import load_tokenizer

    used = []
    real_stream = generate.stream_text
    spy = lambda model, *a, **k: used.append(model) or real_stream(model, *a, **k)  # noqa: E731
    monkeypatch.setattr(generate, "stream_text", spy)
    main(["generate", "--run", str(pretrained[0]), "--prompt", "ROMEO:", "--temperature", "0",
          "--max-new-tokens", "8", "--dtype", "int8"])
    (model,) = used
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    int8 = quantize_int8(load_run_model(pretrained[0]))
    expected = "".join(real_stream(int8, load_tokenizer(pretrained[0]), "ROMEO:", Sampling(temperature=0,
                                                                                              max_new_tokens=8)))
    assert expected and capsys.readouterr().out == "ROMEO:" + expected + "\n"
    with pytest.raises(ChatforgeError, match="must be one of fp32, bf16, int8"):
        for_inference(load_run_model(pretrained[0]), "int4")
