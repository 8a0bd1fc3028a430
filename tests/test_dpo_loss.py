"""DPO's arithmetic (training.dpo): ln 2 at the first step, the gradient, the response mask.

Tiny random models; the batches come from the project's own collate with the prompt masked, as
a DPO run builds them.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from instructune.data.collate import collate
from instructune.data.dataset import TokenizedRecord
from instructune.models import build_model, get_config
from instructune.training.dpo import DpoStats, dpo_loss, sequence_logprobs
from instructune.training.loss import IGNORE_INDEX

PAD = 0


def tiny(arch: str, dtype=torch.float32, drop_rate: float = 0.0):
    name = "gpt2" if arch == "gpt2" else "smollm2-135m"
    overrides = dict(n_layers=2, emb_dim=32, n_heads=2, hidden_dim=64, context_length=64)
    overrides.update(vocab_size=97, drop_rate=drop_rate)
    if arch == "llama":
        overrides.update(n_kv_heads=1)
    torch.manual_seed(0)
    return build_model(get_config(name, **overrides)).to(dtype).eval()


def pairs():
    """Two preference pairs: the same prompt ids, a chosen and a rejected response each."""
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    chosen = [[20, 21, 22, 1], [23, 24, 1]]
    rejected = [[30, 31, 1], [32, 33, 34, 35, 1]]

    def side(responses):
        items = [TokenizedRecord(p + r, len(p)) for p, r in zip(prompts, responses, strict=True)]
        return collate(items, pad_id=PAD, mask_prompt=True)

    return side(chosen), side(rejected)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_first_step_loss_is_ln_2_and_the_margin_0(arch):
    policy = tiny(arch)
    reference = copy.deepcopy(policy)  # the starting model, frozen: the first step's reference
    (ci, ct), (ri, rt) = pairs()
    with torch.no_grad():
        ref_c, ref_r = sequence_logprobs(reference, ci, ct), sequence_logprobs(reference, ri, rt)
    losses, chosen, rejected = dpo_loss(
        sequence_logprobs(policy, ci, ct), sequence_logprobs(policy, ri, rt), ref_c, ref_r
    )
    stats = DpoStats.of(losses, chosen, rejected)
    assert abs(stats.loss - math.log(2)) < 1e-6
    assert stats.margin == 0 and stats.chosen_reward == 0 and stats.accuracy == 0
    # A step on it moves the chosen side up against the rejected one.
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    losses.mean().backward()
    opt.step()
    with torch.no_grad():
        after = DpoStats.of(
            *dpo_loss(
                sequence_logprobs(policy, ci, ct), sequence_logprobs(policy, ri, rt), ref_c, ref_r
            )
        )
    assert after.margin > 0 and after.loss < math.log(2)


def test_logprobs_are_the_mean_over_response_tokens_only():
    model = tiny("llama")
    (ci, ct), _ = pairs()
    got = sequence_logprobs(model, ci, ct)
    with torch.no_grad():
        logp = model(ci).float().log_softmax(-1)
    want, everything = [], []
    for b in range(ci.shape[0]):
        keep = ct[b] != IGNORE_INDEX
        # The prompt is 4 and 3 ids long: the first response token is predicted at position
        # len(prompt) - 1; the response (end token included) is 4 and 3 tokens.
        assert keep.sum() == [4, 3][b] and keep.nonzero()[0].item() == [3, 2][b]
        rows = logp[b, keep].gather(1, ct[b, keep].unsqueeze(1))
        want.append(rows.mean())
        real = ci[b] != PAD
        everything.append(logp[b, real][:-1].gather(1, ci[b, real][1:].unsqueeze(1)).mean())
    torch.testing.assert_close(got, torch.stack(want), atol=1e-6, rtol=0)
    # Counting the prompt's tokens too would give another number: the mask matters.
    assert (got - torch.stack(everything)).abs().max() > 1e-3


def test_the_gradient_matches_finite_differences():
    policy = tiny("gpt2", torch.float64)
    reference = tiny("gpt2", torch.float64)
    with torch.no_grad():  # a reference that differs from the policy: a later step
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    (ci, ct), (ri, rt) = pairs()
    with torch.no_grad():
        ref_c, ref_r = sequence_logprobs(reference, ci, ct), sequence_logprobs(reference, ri, rt)

    def loss() -> torch.Tensor:
        pc, pr = sequence_logprobs(policy, ci, ct), sequence_logprobs(policy, ri, rt)
        return dpo_loss(pc.double(), pr.double(), ref_c.double(), ref_r.double(), beta=0.5)[
            0
        ].mean()

    policy.zero_grad()
    loss().backward()
    weight = policy.blocks[0].attn.qkv.weight
    eps = 1e-6
    for index in [(0, 0), (5, 3), (40, 17)]:
        with torch.no_grad():
            weight[index] += eps
            up = loss().item()
            weight[index] -= 2 * eps
            down = loss().item()
            weight[index] += eps
        numeric = (up - down) / (2 * eps)
        assert abs(weight.grad[index].item() - numeric) < 1e-6 * max(1.0, abs(numeric)), index


def test_beta_must_be_positive():
    zero = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(zero, zero, zero, zero, beta=0.0)


def test_the_reference_cache_equals_recomputation_and_knows_its_key(tmp_path):
    from instructune.training.dpo import (
        load_reference_logprobs,
        reference_logprobs,
        save_reference_logprobs,
    )

    reference = tiny("llama", drop_rate=0.3)
    reference.train()  # the cache must not depend on dropout or the mode it was left in
    (ci, ct), (ri, rt) = pairs()
    batches = [((ci[:1], ct[:1]), (ri[:1], rt[:1])), ((ci[1:], ct[1:]), (ri[1:], rt[1:]))]
    chosen, rejected = reference_logprobs(reference, batches)
    assert reference.training  # back in the mode it came in
    path = tmp_path / "reference-logprobs.safetensors"
    save_reference_logprobs(path, chosen, rejected, key="weights-abc:records-123")
    cached = load_reference_logprobs(path, key="weights-abc:records-123")
    reference.eval()
    with torch.no_grad():
        again = (sequence_logprobs(reference, ci, ct), sequence_logprobs(reference, ri, rt))
    for got, want in zip(cached, again, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # Another reference or other records: no cache, compute again.
    assert load_reference_logprobs(path, key="weights-xyz:records-123") is None
    assert load_reference_logprobs(tmp_path / "missing.safetensors", key="k") is None
