"""Training without padding: a batch's rows packed end to end (``segments``) give the padded
batch's losses and gradients, for GPT-2 and Llama, with and without activation checkpointing."""

from __future__ import annotations

import pytest
import torch

from instructune.models import build_model, get_config
from instructune.training.loss import IGNORE_INDEX, packed_rows, supervised_loss_sum

SHAPES = {
    "gpt2": dict(n_layers=2, emb_dim=32, n_heads=2, hidden_dim=64, context_length=64),
    "smollm2-135m": dict(
        n_layers=2, emb_dim=32, n_heads=4, n_kv_heads=2, hidden_dim=64, context_length=64,
        vocab_size=300,
    ),
}  # fmt: skip


def model_of(name: str, *, drop_rate: float = 0.0):
    torch.manual_seed(0)
    extra = {"drop_rate": drop_rate} if drop_rate else {}
    return build_model(get_config(name, **SHAPES[name], **extra)).train()


def padded_batch(vocab: int):
    """Rows of 20, 9 and 14 real tokens padded to 20; row 1 masks its prompt; row 3 has no
    target at all (its prompt fills it, as truncation can leave a record)."""
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randint(0, vocab, (4, 20), generator=gen)
    targets = torch.randint(0, vocab, (4, 20), generator=gen)
    targets[1, :4] = IGNORE_INDEX
    targets[1, 9:] = IGNORE_INDEX
    targets[2, 14:] = IGNORE_INDEX
    targets[3, :] = IGNORE_INDEX
    return inputs, targets


def test_packed_rows_cut_each_row_after_its_last_target():
    inputs, targets = padded_batch(300)
    packed_inputs, packed_targets, segments, _kept = packed_rows(inputs, targets)
    assert segments == (20, 9, 14)
    assert packed_inputs.shape == packed_targets.shape == (1, 43)
    assert packed_inputs[0, 20:29].tolist() == inputs[1, :9].tolist()
    assert packed_targets[0, 29:].tolist() == targets[2, :14].tolist()
    full = torch.ones(2, 5, dtype=torch.long)
    assert packed_rows(full, full) is None  # nothing to drop: the batch as it is


@pytest.mark.parametrize("name", ["gpt2", "smollm2-135m"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_training_gives_the_padded_loss_and_gradients(name, checkpointing):
    inputs, targets = padded_batch(300 if name != "gpt2" else 50257)
    results = []
    for pack in (False, True):
        model = model_of(name)
        model.gradient_checkpointing = checkpointing
        if not pack:
            model.packs_sequences = False  # the padded batch, as before packing
        loss = supervised_loss_sum(model, inputs, targets)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters()}
        results.append((loss.item(), grads))
    (padded_loss, padded_grads), (packed_loss, packed_grads) = results
    assert packed_loss == pytest.approx(padded_loss, rel=1e-6)
    for k, g in padded_grads.items():
        torch.testing.assert_close(packed_grads[k], g, rtol=1e-5, atol=1e-6, msg=k)


def test_packed_forward_matches_each_sequence_alone():
    """Each packed sequence's hidden states are those of the sequence run on its own."""
    model = model_of("smollm2-135m").eval()
    gen = torch.Generator().manual_seed(5)
    seqs = [torch.randint(0, 300, (n,), generator=gen) for n in (7, 12, 3)]
    with torch.no_grad():
        packed = model.forward_hidden(torch.cat(seqs)[None], segments=(7, 12, 3))[0]
        alone = torch.cat([model.forward_hidden(s[None])[0] for s in seqs])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="packed input must be"):
        model.forward_hidden(torch.cat(seqs)[None], segments=(7, 12))


@pytest.mark.parametrize("pack", [False, True])
def test_per_record_loss_is_the_sum_of_each_rows_mean_cross_entropy(pack):
    """``per_record``: the fused, packed loss and its gradients equal those of the book's
    full-logits cross-entropy taken as each row's token mean, summed over rows (a row
    without a target adds nothing), for any grad_scale."""
    inputs, targets = padded_batch(300)
    model = model_of("smollm2-135m")
    model.packs_sequences = pack
    loss = supervised_loss_sum(model, inputs, targets, per_record=True, grad_scale=0.25)
    (loss * 0.25).backward()
    fused_grads = {k: p.grad.clone() for k, p in model.named_parameters()}

    reference_model = model_of("smollm2-135m")
    reference_model.packs_sequences = False
    logits = reference_model(inputs)
    per_row = [
        torch.nn.functional.cross_entropy(logits[i], targets[i], ignore_index=IGNORE_INDEX)
        for i in range(3)  # row 3 has no target
    ]
    reference = torch.stack(per_row).sum()
    (reference * 0.25).backward()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)
    for k, p in reference_model.named_parameters():
        torch.testing.assert_close(fused_grads[k], p.grad, rtol=1e-5, atol=1e-6, msg=k)


def test_the_objective_counts_records_or_tokens():
    from instructune.training.loop import SupervisedObjective

    inputs, targets = padded_batch(300)
    assert SupervisedObjective().sizes((inputs, targets)) == (39, 39, 80)
    assert SupervisedObjective(per_record=True).sizes((inputs, targets)) == (3, 39, 80)


def test_per_record_weights_reach_the_fp16_gradients():
    """Under fp16 the row weights ride with the 2**15 factor on the gradient operand; the
    gradients match fp32's per-record ones to fp16's rounding."""
    inputs, targets = padded_batch(300)
    grads = {}
    for precision in ("fp32", "fp16"):
        model = model_of("smollm2-135m")
        with torch.autocast("cpu", dtype=torch.float16, enabled=precision == "fp16"):
            loss = supervised_loss_sum(model, inputs, targets, per_record=True, grad_scale=1 / 3)
        (loss / 3).backward()
        grads[precision] = {k: p.grad.float() for k, p in model.named_parameters()}
    for k, ref in grads["fp32"].items():
        error = float((grads["fp16"][k] - ref).norm() / ref.norm())
        assert error < 1e-2, (k, error)
