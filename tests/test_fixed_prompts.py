"""Training on answers over fixed prompts (``prompt_gradient`` off): the loss is the packed
loss to rounding, and the gradient is the exact gradient with the prompt positions' keys and
values held constant (a full padded forward whose q/k/v projection is detached at prompt
positions), for GPT-2 and Llama."""

from __future__ import annotations

import pytest
import torch

from instructune.training.loss import IGNORE_INDEX, supervised_loss_sum
from tests.test_packing import model_of


def answer_batch(vocab: int):
    """Rows of 20, 9 and 14 real tokens padded to 20, prompts of 6, 3 and 5 tokens (no loss
    there); row 3 has no target at all."""
    gen = torch.Generator().manual_seed(7)
    inputs = torch.randint(0, vocab, (4, 20), generator=gen)
    targets = torch.randint(0, vocab, (4, 20), generator=gen)
    for row, (prompt, length) in enumerate([(6, 20), (3, 9), (5, 14), (20, 20)]):
        targets[row, :prompt] = IGNORE_INDEX
        targets[row, length:] = IGNORE_INDEX
    return inputs, targets


def reference_gradients(model, inputs, targets):
    """The padded batch's loss, each row alone, with the gradient stopped at the prompt
    positions' q/k/v: what reaches the weights then comes through the answers alone."""
    supervised = targets != IGNORE_INDEX
    first = torch.where(supervised, torch.arange(targets.shape[1]), 10**6).amin(dim=1)
    total = torch.zeros(())
    for row in range(inputs.shape[0]):
        if not bool(supervised[row].any()):
            continue
        end = int(torch.where(supervised[row])[0].max()) + 1
        prompt = torch.arange(end) < first[row]

        def detach_prompt(_module, _args, out, prompt=prompt):
            return torch.where(prompt[None, :, None], out.detach(), out)

        hooks = [b.attn.qkv.register_forward_hook(detach_prompt) for b in model.blocks]
        try:
            model.packs_sequences = False
            total = total + supervised_loss_sum(model, inputs[row : row + 1, :end],
                                                targets[row : row + 1, :end])  # fmt: skip
        finally:
            model.packs_sequences = True
            for hook in hooks:
                hook.remove()
    total.backward()
    return total.item(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["gpt2", "smollm2-135m"])
def test_fixed_prompts_give_the_loss_and_the_answers_gradient(name):
    inputs, targets = answer_batch(300 if name != "gpt2" else 50257)
    model = model_of(name)
    ref_loss, ref_grads = reference_gradients(model, inputs, targets)

    model = model_of(name)
    exact = supervised_loss_sum(model, inputs, targets)
    exact.backward()
    exact_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    model = model_of(name)
    loss = supervised_loss_sum(model, inputs, targets, fixed_prompts=True)
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters()}

    assert loss.item() == pytest.approx(exact.item(), rel=1e-6)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-6)
    for k, g in ref_grads.items():
        torch.testing.assert_close(grads[k], g, rtol=1e-5, atol=1e-6, msg=k)
    # The approximation is a real one: the lowest block's projection gets less than the exact
    # gradient (none through the prompts).
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.allclose(grads[qkv], exact_grads[qkv], rtol=1e-3, atol=1e-6)


def test_fixed_prompts_need_a_prompt_on_every_row():
    model = model_of("smollm2-135m")
    inputs = torch.randint(0, 300, (2, 6))
    targets = inputs.clone()  # every position supervised: no prompt to fix
    with pytest.raises(ValueError, match="a prompt before every row's first target"):
        supervised_loss_sum(model, inputs, targets, fixed_prompts=True)


def test_a_run_with_fixed_prompts_trains_and_refuses_a_loss_on_the_prompt(tmp_path):
    import json

    from helpers import tiny_config

    from instructune.config import ConfigError
    from instructune.pipeline import run_finetune

    out = tmp_path / "fixed"
    run_finetune(tiny_config(out, max_steps=3, lr=1e-3, mask_instructions=True,
                             prompt_gradient=False))  # fmt: skip
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [s["loss"] for s in steps if s.get("kind") == "step"]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert (out / "model.safetensors").exists()
    for bad in (
        {"mask_instructions": False},
        {"mask_instructions": True, "loss_average": "record"},
    ):
        with pytest.raises(ConfigError, match="'prompt_gradient': off needs mask_instructions"):
            run_finetune(tiny_config(tmp_path / "bad", prompt_gradient=False, **bad))
