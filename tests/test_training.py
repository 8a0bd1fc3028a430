"""Unit tests of the training pieces: loss, schedule, loop arithmetic, checkpoints, metrics."""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys

import pytest
import torch

from instructune.errors import InstructuneError
from instructune.models import build_model, get_config
from instructune.training import state as state_mod
from instructune.training.loop import (
    LoopData,
    LoopSettings,
    TrainingDiverged,
    TrainingInterrupted,
    evaluate_loss,
    make_optimizer,
    split_global_batch,
    train,
)
from instructune.training.loss import (
    SupervisedLoss,
    linear_cross_entropy_sum,
    reference_loss_sum,
    supervised_loss_sum,
)
from instructune.training.metrics import (
    MetricsLog,
    count_matmul_params,
    read_metrics,
    supervised_mfu,
    truncate_metrics,
    without_timings,
)
from instructune.training.schedule import lr_at

VOCAB = 97


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    shape = dict(n_layers=2, emb_dim=32, n_heads=4, vocab_size=VOCAB, context_length=64)
    shape.update(overrides)
    return build_model(get_config("gpt2", hidden_dim=4 * shape["emb_dim"], **shape))


def collate(items):
    """The book's collate on plain id lists that already end with an end token (id 0)."""
    longest = max(len(i) for i in items)
    inputs = torch.zeros(len(items), longest - 1, dtype=torch.long)
    targets = torch.full((len(items), longest - 1), -100, dtype=torch.long)
    for row, ids in enumerate(items):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        targets[row, : len(ids) - 1] = torch.tensor(ids[1:])
    return inputs, targets


def make_data(n_train=32, n_val=8, batch=8, seed=0):
    rng = random.Random(seed)
    items = [
        [rng.randrange(1, VOCAB) for _ in range(rng.randrange(4, 24))] + [0]
        for _ in range(n_train + n_val)
    ]

    def order(epoch):
        idx = list(range(n_train))
        random.Random(f"{seed}:{epoch}").shuffle(idx)
        return [idx[i : i + batch] for i in range(0, n_train - batch + 1, batch)]

    val_batches = [list(range(i, min(i + 4, n_val))) for i in range(0, n_val, 4)]
    return LoopData(items[:n_train], items[n_train:], collate, order, val_batches)


# ---------------------------------------------------------------------------- loss


def test_fused_loss_equals_book_loss_and_gradients():
    model = tiny_model()
    inputs = torch.randint(0, VOCAB, (3, 11))
    targets = inputs.roll(-1, 1).clone()
    targets[0, 6:] = -100
    targets[2, :4] = -100  # a masked prompt
    ref = reference_loss_sum(model(inputs), targets)
    model.zero_grad()
    ref.backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ours = supervised_loss_sum(model, inputs, targets, chunk_rows=5)  # several chunks
    ours.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)
    for (name, p), g in zip(model.named_parameters(), ref_grads, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("hint, factor", [(0.25, 0.25), (0.5, 0.25), (1.0, 3.0)])
def test_grad_scale_hint_never_changes_the_gradients(hint, factor):
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (9,))
    (
        torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum") * factor
    ).backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    (
        linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=4, grad_scale=hint) * factor
    ).backward()
    assert torch.allclose(hidden.grad, want[0], atol=1e-5)
    assert torch.allclose(weight.grad, want[1], atol=1e-5)


def test_the_usual_upstream_gradient_costs_no_pass_over_the_head_gradient():
    # The loop multiplies the fp32 loss by the hint it passed (1 / tokens), so backward
    # receives fp32(hint): that must be recognised as the factor already applied, not
    # multiplied into the (V, D) head gradient once more (a pass over ~39M floats for GPT-2).
    torch.manual_seed(0)
    hidden = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(0, 40, (9,))
    loss = linear_cross_entropy_sum(hidden, weight, targets, grad_scale=1 / 7) * (1 / 7)
    with torch.profiler.profile(record_shapes=True) as prof:
        loss.backward()
    passes = [e for e in prof.events() if e.name == "aten::mul" and [40, 16] in e.input_shapes]
    assert passes == []
    want = torch.autograd.grad(
        torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum") / 7,
        (hidden, weight),
    )
    torch.testing.assert_close(hidden.grad, want[0])
    torch.testing.assert_close(weight.grad, want[1])


def test_loss_without_grad_matches_and_counts_only_supervised():
    torch.manual_seed(0)
    hidden = torch.randn(7, 16)
    weight = torch.randn(50, 16)
    targets = torch.randint(0, 50, (7,))
    with torch.no_grad():
        ours = linear_cross_entropy_sum(hidden, weight, targets, chunk_rows=3)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


def test_matmul_params_counts_head_once():
    model = tiny_model()
    per_layer = 32 * 96 + 32 * 32 + 32 * 128 + 128 * 32
    assert count_matmul_params(model) == 2 * per_layer + VOCAB * 32
    assert count_matmul_params(build_model(get_config("gpt2"), device="meta")) == pytest.approx(
        123.5e6, rel=2e-3
    )
    assert supervised_mfu(100, 10.0, 6000.0) == pytest.approx(1.0)


# ---------------------------------------------------------------------------- schedule


def test_schedules():
    assert lr_at(0, base_lr=1.0) == 1.0
    assert [lr_at(s, base_lr=1.0, warmup_steps=4) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cos = [
        lr_at(s, base_lr=1.0, schedule="cosine", total_steps=10, min_lr_ratio=0.1)
        for s in range(11)
    ]
    assert cos[0] == 1.0 and cos[10] == pytest.approx(0.1) and cos[5] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(cos[:-1], cos[1:], strict=True))
    with pytest.raises(ValueError):
        lr_at(0, base_lr=1.0, schedule="cosine")


# ---------------------------------------------------------------------------- loop


def _one_step(batch_size: int, grad_accum: int):
    model = tiny_model(seed=1)
    data = make_data(batch=8)
    # SGD with lr 1: the update *is* the gradient (Adam's first step, ~lr*sign(g), would hide
    # or exaggerate differences in tiny gradient components).
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    settings = LoopSettings(
        max_steps=1,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=1.0,
        eval_every=100,
        eval_batches=1,
        quiet=True,
    )
    train(model, opt, data, settings, device=torch.device("cpu"))
    return model


def test_grad_accumulation_gives_the_update_of_one_big_batch():
    # Batch 8 in one go, and the same 8 records as 2 x 4 accumulated (sequences of different
    # lengths, so a per-micro-batch mean would weigh tokens differently).
    big = _one_step(batch_size=8, grad_accum=1)
    accum = _one_step(batch_size=4, grad_accum=2)
    for (name, a), b in zip(big.named_parameters(), accum.parameters(), strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_optimizer_in_backward_matches_the_plain_step_and_checkpoints(tmp_path):
    def run(in_backward: bool, steps: int, model=None, opt=None):
        model = model or tiny_model(seed=3)
        opt = opt or make_optimizer(
            model, lr=1e-2, weight_decay=0.1, device=torch.device("cpu"), in_backward=in_backward
        )
        settings = LoopSettings(max_steps=steps, lr=1e-2, eval_every=100, quiet=True)
        train(model, opt, make_data(), settings, device=torch.device("cpu"))
        return model, opt

    plain, _ = run(False, 3)
    hooked, opt = run(True, 3)
    for (name, a), b in zip(plain.named_parameters(), hooked.parameters(), strict=True):
        assert torch.equal(a, b), name
        assert b.grad is None  # freed during backward
    # Its state survives a checkpoint.
    path = state_mod.save_checkpoint(
        tmp_path, model=hooked, optimizer=opt, progress=state_mod.TrainProgress(step=3)
    )
    other = tiny_model(seed=4)
    other_opt = make_optimizer(
        other, lr=1e-2, weight_decay=0.1, device=torch.device("cpu"), in_backward=True
    )
    _, st = state_mod.load_checkpoint(path, model=other, optimizer=other_opt)
    assert st["optimizer_restored"]
    a = opt.state_dict()["in_backward"][0]["state"][0]["exp_avg"]
    assert torch.equal(a, other_opt.state_dict()["in_backward"][0]["state"][0]["exp_avg"])


@pytest.mark.parametrize("in_backward", [False, True])
def test_adam_state_allocated_up_front_is_torchs_own(in_backward):
    # The moments exist before the first step (less heap fragmentation, see optim.py) and
    # are what torch would have made: the same keys, dtypes and devices, and after three
    # steps the same weights and state as a stock AdamW that allocated them itself.
    model = tiny_model(seed=3)
    opt = make_optimizer(
        model, lr=1e-2, weight_decay=0.1, device=torch.device("cpu"), in_backward=in_backward
    )
    optimizers = opt.optimizers if in_backward else [opt]
    assert all(len(o.state) == len(o.param_groups[0]["params"]) for o in optimizers)
    reference = tiny_model(seed=3)
    stock = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1, fused=True)
    assert not stock.state
    for model_, opt_ in ((model, opt), (reference, stock)):
        settings = LoopSettings(max_steps=3, lr=1e-2, eval_every=100, quiet=True)
        train(model_, opt_, make_data(), settings, device=torch.device("cpu"))
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name
    ours = [s for o in optimizers for s in o.state.values()]
    for mine, theirs in zip(ours, stock.state.values(), strict=True):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert mine[key].dtype == theirs[key].dtype, key
            assert mine[key].device == theirs[key].device, key
            assert torch.equal(mine[key], theirs[key]), key


def test_optimizer_in_backward_refuses_accumulation():
    model = tiny_model()
    opt = make_optimizer(
        model, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"), in_backward=True
    )
    settings = LoopSettings(max_steps=1, batch_size=4, grad_accum=2, quiet=True)
    with pytest.raises(InstructuneError, match="no --grad-accum"):
        train(model, opt, make_data(), settings, device=torch.device("cpu"))


def test_split_global_batch():
    assert split_global_batch(list(range(8)), 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert split_global_batch(list(range(5)), 2) == [[0, 1, 2], [3, 4]]


def test_training_lowers_the_loss_and_writes_metrics(tmp_path):
    model = tiny_model()
    data = make_data()
    opt = make_optimizer(model, lr=3e-3, weight_decay=0.0, device=torch.device("cpu"))
    before = evaluate_loss(model, data.items, data.order(0), collate, device=torch.device("cpu"))
    log = MetricsLog(tmp_path / "metrics.jsonl")
    result = train(
        model,
        opt,
        data,
        LoopSettings(epochs=4, lr=3e-3, eval_every=3, quiet=True),
        device=torch.device("cpu"),
        metrics=log,
    )
    log.close()
    after = evaluate_loss(model, data.items, data.order(0), collate, device=torch.device("cpu"))
    assert after < before - 0.3
    records = read_metrics(tmp_path / "metrics.jsonl")
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == list(range(1, 17))
    assert [r["step"] for r in evals] == [1, 4, 7, 10, 13, 16]  # the book's cadence + the end
    assert steps[-1]["epoch"] == 4.0 and steps[3]["epoch"] == 1.0
    assert result.progress.step == 16 and result.progress.epoch == 4
    assert steps[-1]["tokens_seen"] == sum(
        x.numel()
        for e in range(4)
        for b in data.order(e)
        for x in [collate([data.items[i] for i in b])[0]]
    )


def test_nan_loss_stops_with_a_clear_message(tmp_path):
    model = tiny_model()
    data = make_data()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    settings = LoopSettings(epochs=3, lr=1e-3, eval_every=100, checkpoint_every=2, quiet=True)

    def poison(epoch):  # after epoch 1 (step 4, checkpointed), the weights turn NaN
        with torch.no_grad():
            model.blocks[0].norm1.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"became nan at step 5 .*step-000004"):
        train(
            model,
            opt,
            data,
            settings,
            device=torch.device("cpu"),
            run_dir=tmp_path,
            on_epoch_end=poison,
        )
    # The last good checkpoint is intact and loads.
    ckpt = state_mod.latest_valid_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.name == "step-000004"
    fresh = tiny_model(seed=5)
    progress, _ = state_mod.load_checkpoint(ckpt, model=fresh)
    assert all(torch.isfinite(p).all() for p in fresh.parameters())
    assert progress.step == int(ckpt.name.split("-")[1])


def test_absurd_learning_rate_diverges():
    model = tiny_model()
    data = make_data()
    opt = make_optimizer(model, lr=1e12, weight_decay=0.0, device=torch.device("cpu"))
    settings = LoopSettings(epochs=20, lr=1e12, eval_every=1000, quiet=True)
    with pytest.raises(TrainingDiverged, match="Lower --lr"):
        train(model, opt, data, settings, device=torch.device("cpu"))


# ---------------------------------------------------------------------------- checkpoints


def _checkpoint(tmp_path, model, step, val=None, keep=2):
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    progress = state_mod.TrainProgress(step=step, last_val_loss=val)
    return state_mod.save_checkpoint(
        tmp_path, model=model, optimizer=opt, progress=progress, keep=keep
    )


def test_checkpoints_keep_last_k_and_best_with_optimizer_only_in_latest(tmp_path):
    model = tiny_model()
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, 2.6)]:
        _checkpoint(tmp_path, model, step, val)
    names = [p.name for p in state_mod.list_checkpoints(tmp_path)]
    assert names == ["step-000002", "step-000004", "step-000005"]  # best (1.0) + last 2
    assert state_mod.best_checkpoint(tmp_path).name == "step-000002"
    has_opt = {p.name: (p / "optimizer.pt").exists() for p in state_mod.list_checkpoints(tmp_path)}
    assert has_opt == {"step-000002": False, "step-000004": False, "step-000005": True}
    for p in state_mod.list_checkpoints(tmp_path):
        assert state_mod.verify_checkpoint(p) == []
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_a_kill_while_pruning_never_leaves_a_manifest_naming_a_missing_file(tmp_path, monkeypatch):
    """Pruning drops the older checkpoint's optimizer state; a kill mid-way must not break it."""
    model = tiny_model()
    _checkpoint(tmp_path, model, 1)
    write_manifest = state_mod._write_manifest

    def killed_while_pruning(directory, files):
        if directory.name.startswith("step-"):  # rewriting a finished checkpoint's manifest
            raise KeyboardInterrupt
        write_manifest(directory, files)

    monkeypatch.setattr(state_mod, "_write_manifest", killed_while_pruning)
    with pytest.raises(KeyboardInterrupt):
        _checkpoint(tmp_path, model, 2)
    monkeypatch.undo()
    older = state_mod.list_checkpoints(tmp_path)[0]
    assert older.name == "step-000001"
    assert state_mod.verify_checkpoint(older) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "no-manifest", "delete"])
def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, damage, capsys):
    model = tiny_model()
    _checkpoint(tmp_path, model, 1)
    with torch.no_grad():
        model.tok_emb.weight.add_(1.0)
    latest = _checkpoint(tmp_path, model, 2)
    weights = latest / "model.safetensors"
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "no-manifest":
        (latest / "manifest.json").unlink()
    else:
        weights.unlink()
    warnings = []
    found = state_mod.latest_valid_checkpoint(tmp_path, warn=warnings.append)
    assert found.name == "step-000001"
    assert "step-000002" in warnings[0]
    with pytest.raises(state_mod.CheckpointError):
        state_mod.load_checkpoint(latest, model=tiny_model())


def test_checkpoint_restores_rng_and_optimizer(tmp_path):
    model = tiny_model()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    model(torch.randint(0, VOCAB, (2, 5))).sum().backward()
    opt.step()
    torch.manual_seed(42)
    random.seed(7)
    path = state_mod.save_checkpoint(
        tmp_path,
        model=model,
        optimizer=opt,
        progress=state_mod.TrainProgress(step=3, epoch=1, batches_done=2),
    )
    expected = (torch.rand(3), random.random())
    torch.manual_seed(0)
    random.seed(0)
    other = tiny_model(seed=9)
    other_opt = make_optimizer(other, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    progress, state = state_mod.load_checkpoint(path, model=other, optimizer=other_opt)
    assert (progress.step, progress.epoch, progress.batches_done) == (3, 1, 2)
    assert state["optimizer_restored"]
    assert torch.equal(torch.rand(3), expected[0]) and random.random() == expected[1]
    for a, b in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


# ---------------------------------------------------------------------------- metrics, plot


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"kind": "step", "step": s, "loss": 1.0 / s, "tokens_per_s": 5.0} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "st')  # torn line
    assert truncate_metrics(path, 3) == 3
    records = read_metrics(path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert without_timings(records)[0] == {"kind": "step", "step": 1, "loss": 1.0}


def test_plot_writes_png_and_pdf(tmp_path):
    from instructune.training.plots import plot_losses

    records = [
        {
            "kind": "eval",
            "step": s,
            "epoch": s / 4,
            "tokens_seen": 100 * s,
            "train_loss": 3 - 0.1 * s,
            "val_loss": 3.1 - 0.08 * s,
        }
        for s in range(0, 9)
    ]
    paths = plot_losses(records, tmp_path)
    assert [p.name for p in paths] == ["loss.png", "loss.pdf"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "loss.pdf").read_bytes()[:5] == b"%PDF-"


def test_supervised_loss_module_matches_function():
    model = tiny_model()
    inputs = torch.randint(0, VOCAB, (2, 6))
    targets = inputs.roll(-1, 1)
    assert SupervisedLoss(model)(inputs, targets).item() == pytest.approx(
        supervised_loss_sum(model, inputs, targets).item()
    )
    assert math.isfinite(SupervisedLoss(model)(inputs, targets).item())


def test_bf16_autocast_loss_and_gradients_stay_close_to_fp32():
    model = tiny_model()
    inputs = torch.randint(0, VOCAB, (2, 9))
    targets = inputs.roll(-1, 1)
    ref = supervised_loss_sum(model, inputs, targets)
    ref.backward()
    want = model.tok_emb.weight.grad.clone()
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = supervised_loss_sum(model, inputs, targets, grad_scale=1.0)
    got.backward()
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(ref.item(), rel=2e-2)
    assert model.tok_emb.weight.grad.dtype == torch.float32
    assert torch.allclose(model.tok_emb.weight.grad, want, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------- fp16


def _head_gradients(precision: str, inputs, targets, vocab: int) -> dict[str, torch.Tensor]:
    """Every parameter's gradient of the mean token loss, as the loop computes it."""
    model = tiny_model(n_layers=1, vocab_size=vocab, tie_embeddings=False)
    with torch.no_grad():  # hidden states of ~0.02: see the test's docstring
        model.final_norm.weight.mul_(0.02)
    n = int((targets != -100).sum())
    if precision == "fp32":
        (supervised_loss_sum(model, inputs, targets, grad_scale=1 / n) / n).backward()
    else:
        scaler = torch.amp.GradScaler("cpu")
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        with torch.autocast("cpu", dtype=torch.float16):
            loss = supervised_loss_sum(model, inputs, targets, grad_scale=1 / n) / n
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
    return {name: p.grad for name, p in model.named_parameters()}


def test_fp16_gradients_match_fp32_and_flush_no_head_entry_to_zero():
    """``--precision fp16`` (the ``auto`` choice on GPUs without bf16) at N = 8192 tokens.

    With GPT-2's 50257-token vocabulary most probabilities p are near 2e-5, and the head
    gradient sums p * h / N: pre-multiplied by 1/N in fp16, such products fell below fp16's
    range and were flushed to zero. A 512-token vocabulary with hidden states scaled to
    ~0.02 reaches the same p * h here. Tolerance: fp16 rounds to 2**-11 = 4.9e-4 relative, and
    the operands and the body's matmul results are rounded a few times each, so every
    parameter's gradient must lie within 3e-3 (relative, in norm) of fp32's; measured: at most
    1.3e-3, and 6e-3 to 5e-2 with the fp16 pre-scaling it replaces.
    """
    vocab = 512
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randint(0, vocab, (128, 64), generator=gen)
    targets = torch.randint(0, vocab, (128, 64), generator=gen)
    assert int((targets != -100).sum()) >= 8000
    want = _head_gradients("fp32", inputs, targets, vocab)
    got = _head_gradients("fp16", inputs, targets, vocab)
    for name, ref in want.items():
        assert got[name].dtype == torch.float32
        error = float((got[name] - ref).norm() / ref.norm())
        assert error < 3e-3, (name, error)
    head32, head16 = want["out_head.weight"], got["out_head.weight"]
    flushed = (head32 != 0) & (head16 == 0)
    assert int(flushed.sum()) == 0, f"{int(flushed.sum())} of {head32.numel()} entries flushed"


# ---------------------------------------------------------------------------- validation loss


def _masked_collate(items):
    """``items`` are (ids, prompt_length): the prompt's targets are -100, as with
    --mask-instructions; a prompt as long as the item leaves no supervised token."""
    inputs, targets = collate([ids for ids, _ in items])
    for row, (_, prompt) in enumerate(items):
        targets[row, :prompt] = -100
    return inputs, targets


def test_validation_loss_leaves_out_batches_without_supervised_tokens():
    model = tiny_model()
    rng = random.Random(0)
    items = [([rng.randrange(1, VOCAB) for _ in range(12)] + [0], p) for p in (3, 5, 13, 13)]
    cpu = torch.device("cpu")
    alone = evaluate_loss(model, items, [[0, 1]], _masked_collate, device=cpu)
    # The second batch is all prompt (masked, response cut off): no loss, not a loss of 0.
    both = evaluate_loss(model, items, [[0, 1], [2, 3]], _masked_collate, device=cpu)
    assert both == alone and alone > 1.0
    assert evaluate_loss(model, items, [[2, 3]], _masked_collate, device=cpu) is None


# ---------------------------------------------------------------------------- random state


def test_seed_everything_seeds_rank_zero_plainly_and_other_ranks_apart():
    torch.manual_seed(123)
    random.seed(123)
    plain = torch.rand(4), random.random()
    state_mod.seed_everything(123)
    assert torch.equal(torch.rand(4), plain[0]) and random.random() == plain[1]
    state_mod.seed_everything(123, rank=0)
    assert torch.equal(torch.rand(4), plain[0])
    draws = []
    for rank in (1, 2, 1):
        state_mod.seed_everything(123, rank=rank)
        draws.append(torch.rand(4))
    assert torch.equal(draws[0], draws[2])  # a function of (seed, rank)
    assert not torch.equal(draws[0], plain[0]) and not torch.equal(draws[0], draws[1])
    assert state_mod.rank_seed(123, 1) == 123 + 1_000_003
    assert state_mod.rank_seed(2**32 - 1, 1) == 1_000_002  # within NumPy's 32-bit seeds


def test_checkpoint_keeps_every_rank_rng_and_each_rank_restores_its_own(tmp_path):
    model = tiny_model()
    states = []
    for seed in (10, 11):  # rank r's state: seeded 10 + r
        torch.manual_seed(seed)
        states.append(state_mod.capture_rng())
    rank1_next = torch.rand(3)
    for step in (1, 2, 3):  # pruning rewrites the older manifests: the rank files stay listed
        path = state_mod.save_checkpoint(
            tmp_path,
            model=model,
            optimizer=None,
            progress=state_mod.TrainProgress(step=step),
            rng_states=states,
            keep=2,
        )
    for ckpt in state_mod.list_checkpoints(tmp_path):
        assert state_mod.verify_checkpoint(ckpt) == []
        assert (ckpt / "rng-rank1.pt").exists()
    state_mod.load_checkpoint(path, model=tiny_model(), rank=1)
    assert torch.equal(torch.rand(3), rank1_next)
    state_mod.load_checkpoint(path, model=tiny_model())  # no process group: rank 0
    torch.manual_seed(10)
    want = torch.rand(3)
    state_mod.load_checkpoint(path, model=tiny_model(), rank=0)
    assert torch.equal(torch.rand(3), want)
    missing = r"no random state for process 2 \(rng-rank2\.pt\): it was saved by 2 process"
    untouched = tiny_model(seed=3)
    with pytest.raises(state_mod.CheckpointError, match=missing):
        state_mod.load_checkpoint(path, model=untouched, rank=2)
    assert torch.equal(untouched.tok_emb.weight, tiny_model(seed=3).tok_emb.weight)


def _train_with_dropout(data, steps_model, *, run_dir=None, progress=None, hook=None):
    model, opt = steps_model
    settings = LoopSettings(epochs=3, lr=1e-2, eval_every=100, quiet=True)
    return train(
        model,
        opt,
        data,
        settings,
        device=torch.device("cpu"),
        run_dir=run_dir,
        progress=progress,
        on_epoch_end=hook,
    )


def _dropout_model_and_optimizer():
    model = tiny_model(seed=7, drop_rate=0.3)  # seeds torch, as a fresh process does
    return model, make_optimizer(model, lr=1e-2, weight_decay=0.0, device=torch.device("cpu"))


@pytest.mark.parametrize("restore_random", [True, False])
def test_resume_with_dropout_and_sampling_is_bit_exact(tmp_path, restore_random):
    """Dropout and a sampled draw after a resume equal the uninterrupted run's only if the
    random state is restored (the ``False`` case is the control: the test can tell)."""
    data = make_data()
    whole = _dropout_model_and_optimizer()
    _train_with_dropout(data, whole)
    whole_draw = torch.multinomial(torch.ones(50), 8)

    def ctrl_c_after_first_epoch(epoch: int) -> None:
        if epoch == 0:
            signal.raise_signal(signal.SIGINT)

    cut = _dropout_model_and_optimizer()
    with pytest.raises(TrainingInterrupted):
        _train_with_dropout(data, cut, run_dir=tmp_path, hook=ctrl_c_after_first_epoch)
    ckpt = state_mod.latest_valid_checkpoint(tmp_path)
    assert ckpt.name == "step-000004"  # 32 records / 8 a step: the end of the first epoch

    resumed = _dropout_model_and_optimizer()  # a new process: seeded and built afresh
    progress, _ = state_mod.load_checkpoint(
        ckpt, model=resumed[0], optimizer=resumed[1], restore_random=restore_random
    )
    _train_with_dropout(data, resumed, run_dir=tmp_path, progress=progress)
    resumed_draw = torch.multinomial(torch.ones(50), 8)
    pairs = zip(whole[0].parameters(), resumed[0].parameters(), strict=True)
    same = [torch.equal(a, b) for a, b in pairs]
    if restore_random:
        assert all(same) and torch.equal(whole_draw, resumed_draw)
    else:
        assert not all(same) and not torch.equal(whole_draw, resumed_draw)


def test_an_epoch_end_hook_that_samples_does_not_change_training():
    """The per-epoch sample may draw random numbers; a resumed run never replays it."""
    data = make_data()
    plain = _dropout_model_and_optimizer()
    _train_with_dropout(data, plain)
    sampled = _dropout_model_and_optimizer()
    _train_with_dropout(data, sampled, hook=lambda epoch: torch.multinomial(torch.ones(9), 3))
    for a, b in zip(plain[0].parameters(), sampled[0].parameters(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------- Windows


def test_training_imports_and_measures_without_the_resource_module():
    """Windows has no ``resource``: training must import, and peak memory falls back."""
    code = (
        "import sys\n"
        "sys.modules['resource'] = None  # import resource raises ImportError, as on Windows\n"
        "sys.modules['psutil'] = None\n"
        "import instructune.training.loop, instructune.training.metrics as m\n"
        "print(m.peak_rss_bytes())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None"
    from instructune.training.metrics import peak_rss_bytes

    assert peak_rss_bytes() > 10_000_000  # this process, through resource
