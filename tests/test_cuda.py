"""The same results on a CUDA GPU as on the CPU: forward, one training step, fp16/bf16 runs,
a resumed run, greedy decoding and the serving engine.

Skipped where torch sees no CUDA device (CI has none); `make test-cuda` runs them on a GPU box.
Tiny random models (test_generation's, whose sharpened head keeps greedy choices far from
ties), fp32 with TF32 off, so CPU and GPU differ only by summation order.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FIXTURES, tiny_config
from safetensors.torch import load_file
from test_generation import PROMPTS, tiny_model

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch sees none)"),
]

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def no_tf32():
    """Full fp32 matmuls on the GPU, so CPU and GPU may be compared at fp32 tolerances."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def batch(vocab: int = 50257, rows: int = 3, length: int = 40):
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, vocab, (rows, length), generator=gen)
    targets = torch.roll(inputs, -1, dims=1)
    targets[0, :10] = -100  # a masked prompt
    targets[2, 30:] = -100  # padding
    return inputs, targets


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_loss_and_gradients_match_the_cpu(arch):
    """Logits, the fused supervised loss and every gradient agree with the CPU's; then the fused
    AdamW step runs on the GPU. (Weights after one Adam step are not compared: where a gradient
    is near 0, m / sqrt(v) turns fp32 summation noise into a step of up to lr.)"""
    from instructune.training.loss import SupervisedLoss
    from instructune.training.optim import make_optimizer

    inputs, targets = batch()
    count = int((targets != -100).sum())
    results = {}
    for device in (torch.device("cpu"), CUDA):
        model = tiny_model(arch).to(device).train()
        with torch.no_grad():
            logits = model(inputs.to(device)).float().cpu()
        loss = SupervisedLoss(model)(inputs.to(device), targets.to(device), grad_scale=1 / count)
        (loss / count).backward()
        grads = {k: p.grad.float().cpu() for k, p in model.named_parameters()}
        before = {k: p.detach().clone() for k, p in model.named_parameters()}
        make_optimizer(model, lr=1e-3, weight_decay=0.1, device=device).step()
        moved = all(not torch.equal(before[k], p) for k, p in model.named_parameters())
        results[device.type] = logits, float(loss.detach()) / count, grads, moved
    (cpu_logits, cpu_loss, cpu_g, _), (gpu_logits, gpu_loss, gpu_g, gpu_moved) = (
        results["cpu"],
        results["cuda"],
    )
    torch.testing.assert_close(gpu_logits, cpu_logits, rtol=1e-4, atol=2e-4)
    assert gpu_loss == pytest.approx(cpu_loss, rel=1e-5)
    for name, g in cpu_g.items():
        scale = float(g.abs().max())
        torch.testing.assert_close(gpu_g[name], g, rtol=1e-3, atol=1e-5 * scale, msg=name)
    assert gpu_moved


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_on_the_gpu_learns(tmp_path, precision):
    """A whole run under autocast (fp16 with its gradient scaler): finite, falling losses and
    fp32 weights saved; its fused loss matches fp32's within the precision's tolerance."""
    from instructune.pipeline import run_finetune
    from instructune.training.metrics import read_metrics

    out = tmp_path / precision
    cfg = tiny_config(out, device="cuda", precision=precision, max_steps=12, lr=3e-3)
    run_finetune(cfg)
    info = json.loads((out / "run.json").read_text())
    assert info["status"] == "finished" and info["precision"] == precision
    assert info["peak_memory"]["cuda_max_allocated_bytes"] > 0
    steps = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "step"]
    losses = [r["loss"] for r in steps]
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05
    weights = load_file(out / "model.safetensors")
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_a_resumed_gpu_run_matches_an_uninterrupted_one(tmp_path):
    """Stop after 3 steps, resume to 6: the weights of a straight 6-step run (to fp32 noise:
    embedding gradients are summed with atomics on the GPU, in no fixed order)."""
    from instructune.pipeline import run_finetune

    straight = tmp_path / "straight"
    run_finetune(tiny_config(straight, device="cuda", max_steps=6, lr=1e-3))
    split = tmp_path / "split"
    run_finetune(tiny_config(split, device="cuda", max_steps=3, lr=1e-3))
    run_finetune(tiny_config(split, device="cuda", max_steps=6, lr=1e-3), resume=True)
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_decoding_on_the_gpu_gives_the_cpus_tokens(arch):
    """generate() (static batches) and the continuous-batching engine on the GPU both give the
    CPU's greedy tokens for every prompt."""
    from instructune.checkpoints.load import LoadedModel
    from instructune.generation import generate
    from instructune.generation.refill import generate_continuous
    from instructune.tokenization.gpt2 import GPT2Tokenizer

    tok = GPT2Tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    cpu_model = tiny_model(arch).eval()
    want = [r.token_ids for r in generate(cpu_model, tok, ids, max_new_tokens=12, batch_size=4)]
    gpu_model = tiny_model(arch).to(CUDA).eval()
    got = [r.token_ids for r in generate(gpu_model, tok, ids, max_new_tokens=12, batch_size=4)]
    assert got == want
    loaded = LoadedModel(
        model=gpu_model, tokenizer=tok, config=gpu_model.cfg, prompt_format=None,
        source="test", weights="random",
    )  # fmt: skip
    refilled = generate_continuous(loaded, ids, max_batch=3, max_new_tokens=12)
    assert [r.token_ids for r in refilled] == want


def test_bf16_decoding_on_the_gpu_mostly_agrees_with_fp32():
    """Half the weight bytes; greedy answers differ from fp32 only where bf16 rounding flips a
    near-tie, which the sharpened head makes rare."""
    from instructune.generation import generate
    from instructune.tokenization.gpt2 import GPT2Tokenizer

    tok = GPT2Tokenizer()
    ids = [tok.encode(p) for p in PROMPTS]
    fp32 = tiny_model("llama").to(CUDA).eval()
    bf16 = tiny_model("llama").to(CUDA, torch.bfloat16).eval()
    a = [r.token_ids for r in generate(fp32, tok, ids, max_new_tokens=8)]
    b = [r.token_ids for r in generate(bf16, tok, ids, max_new_tokens=8)]
    first_tokens_same = sum(x[:1] == y[:1] for x, y in zip(a, b, strict=True))
    assert first_tokens_same >= len(ids) - 1


def test_evaluation_on_the_gpu_gives_the_cpus_mean_of_batch_losses():
    """On the GPU the batches are evaluated in one forward (padded to the longest of all); the
    mean of each batch's loss per supervised token must not change."""
    from instructune.data.collate import make_collate
    from instructune.training.loop import evaluate_loss

    gen = torch.Generator().manual_seed(2)
    items = [torch.randint(0, 50257, (int(n),), generator=gen).tolist() for n in range(5, 65, 5)]
    batches = [[0, 5, 11], [1, 2], [3, 4, 6, 7], [8, 9, 10]]  # different lengths per batch
    collate = make_collate(pad_id=50256)
    losses = {}
    for device in (torch.device("cpu"), CUDA):
        model = tiny_model("gpt2").to(device)
        losses[device.type] = evaluate_loss(model, items, batches, collate, device=device)
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=1e-5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dpo_on_the_gpu_starts_at_ln_2_and_raises_the_margin(tmp_path, precision):
    """instructune dpo on the GPU: the cached reference makes step 0 exactly ln 2 with margin
    0 (fp32; bf16 within its rounding), and training raises the training margin."""
    import math

    from test_dpo_pipeline import dpo_args, evals

    from instructune.cli.main import main

    records = json.loads((FIXTURES / "instructions-40.json").read_text(encoding="utf-8"))
    pairs = [
        {**r, "chosen": r["output"], "rejected": " ".join(reversed(r["output"].split())) + "."}
        for r in records
    ]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(pairs), encoding="utf-8")
    out = tmp_path / "run"
    args = dpo_args(data, out, "--device", "cuda", "--precision", precision, "--max-steps", "6")
    assert main(args) == 0
    records = evals(out)
    tolerance = 1e-6 if precision == "fp32" else 1e-2
    assert abs(records[0]["val_loss"] - math.log(2)) < tolerance
    assert abs(records[0]["val_margin"]) < tolerance
    assert records[-1]["train_margin"] > records[0]["train_margin"] + 0.1
    info = json.loads((out / "run.json").read_text())
    assert info["device"].startswith("cuda") and info["status"] == "finished"
