"""--freeze-blocks: the embeddings and the lowest blocks fixed, backward stopping above them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_config

from instructune.config import ConfigError
from instructune.models import build_model, get_config
from instructune.models.freeze import freeze_lower_blocks
from instructune.training.loss import IGNORE_INDEX, supervised_loss_sum

SHAPES = {
    "gpt2": dict(n_layers=3, emb_dim=32, n_heads=2, hidden_dim=64, context_length=64),
    "smollm2-135m": dict(n_layers=3, emb_dim=32, n_heads=4, n_kv_heads=2, hidden_dim=64,
                  context_length=64, tie_embeddings=False),
}  # fmt: skip


def tiny(name: str):
    torch.manual_seed(0)
    return build_model(get_config(name, vocab_size=100, **SHAPES[name])).train()


def batch():
    g = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, 100, (2, 12), generator=g)
    targets = torch.randint(0, 100, (2, 12), generator=g)
    targets[:, :4] = IGNORE_INDEX  # a masked prompt
    return inputs, targets


@pytest.mark.parametrize("name", ["gpt2", "smollm2-135m"])
def test_upper_gradients_are_unchanged_and_backward_stops_at_the_frozen_blocks(name):
    inputs, targets = batch()
    full = tiny(name)
    supervised_loss_sum(full, inputs, targets).backward()
    reference = {n: p.grad.clone() for n, p in full.named_parameters()}

    model = tiny(name)
    frozen = freeze_lower_blocks(model, 2)
    seen = []  # whether each block's output is part of the autograd graph
    for block in model.blocks:
        block.register_forward_hook(lambda _m, _a, out: seen.append(out.requires_grad))
    supervised_loss_sum(model, inputs, targets).backward()
    assert seen == [False, False, True]  # nothing below block 2 is differentiated

    lower = ("tok_emb.", "pos_emb.", "blocks.0.", "blocks.1.")
    counted = 0
    for n, p in model.named_parameters():
        if n.startswith(lower):
            assert not p.requires_grad and p.grad is None, n
            counted += p.numel()
        else:  # the upper block, the final norm and an untied head: exactly the full grads
            torch.testing.assert_close(p.grad, reference[n], rtol=1e-5, atol=1e-7, msg=n)
    assert frozen == counted
    # GPT-2 here ties its head to the token embedding: fixed with it (the fused loss then
    # skips the head gradient); the untied Llama head is trained.
    assert model.output_weight.requires_grad == (name != "gpt2")


def test_a_frozen_tied_head_still_gives_the_hidden_states_their_gradient():
    # The fused loss with a weight that needs no gradient, against autograd on full logits.
    torch.manual_seed(2)
    hidden = torch.randn(7, 16, requires_grad=True)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (7,))
    from instructune.training.loss import linear_cross_entropy_sum

    linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=3).mul(0.5).backward()
    ours = hidden.grad.clone()
    hidden.grad = None
    F.cross_entropy(hidden @ weight.T, targets, reduction="sum").mul(0.5).backward()
    torch.testing.assert_close(ours, hidden.grad, rtol=1e-5, atol=1e-6)


def test_out_of_range_is_refused():
    with pytest.raises(ValueError, match="0 to 2 of this model's 3 blocks, not 3"):
        freeze_lower_blocks(tiny("gpt2"), 3)


def test_a_run_keeps_the_frozen_weights_and_trains_the_rest(tmp_path):
    from safetensors.torch import load_file

    from instructune.pipeline import run_finetune

    # Two runs from the same random start at different learning rates: what is frozen ends
    # where it began in both, so equal; every trained weight matrix moved, differently.
    saved = {}
    for lr in (1e-2, 1e-3):
        out = tmp_path / f"lr{lr:g}"
        run_finetune(tiny_config(out, max_steps=2, lr=lr, freeze_blocks=1))
        saved[lr] = load_file(str(out / "model.safetensors"))
    a, b = saved[1e-2], saved[1e-3]
    # Saved under transformers' GPT-2 names: wte, wpe, h.{i}.
    lower = [
        k for k in a if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0."))
    ]
    upper = [k for k in a if k.startswith("transformer.h.1.") and k.endswith("weight")]
    assert lower and upper
    assert all(torch.equal(a[k], b[k]) for k in lower)
    assert all(not torch.equal(a[k], b[k]) for k in upper)
    with pytest.raises(ConfigError, match="freeze_blocks.*0 to 1 of this model's 2 blocks"):
        run_finetune(tiny_config(tmp_path / "bad", freeze_blocks=2))
    with pytest.raises(ConfigError, match="LoRA already keeps every base weight fixed"):
        run_finetune(tiny_config(tmp_path / "lora", freeze_blocks=1, lora_rank=2))
