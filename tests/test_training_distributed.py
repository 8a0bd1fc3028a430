"""The loop under a real process group: two gloo processes on CPU, started by torch.multiprocessing.

- Every collective the loop calls gets a tensor on the loop's device (NCCL refuses others).
- A 2-process run with dropout, interrupted and resumed, ends with the weights of an
  uninterrupted one, and the two processes draw different dropout masks.
- torchrun with one process starts a process group too.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
import torch.multiprocessing as mp
from torch.overrides import TorchFunctionMode

from instructune.models import build_model, get_config
from instructune.training import distributed as dist
from instructune.training import state as state_mod
from instructune.training.loop import (
    LoopData,
    LoopSettings,
    TrainingInterrupted,
    evaluate_loss,
    make_optimizer,
    train,
)

VOCAB = 61
WORLD = 2
TENSOR_COLLECTIVES = ("all_reduce", "broadcast", "reduce", "all_gather", "all_gather_into_tensor")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args) -> None:
    """Run ``worker(rank, port, *args)`` in WORLD fresh processes; re-raises their errors."""
    mp.spawn(worker, args=(free_port(), *args), nprocs=WORLD, join=True)


def join_group(rank: int, port: int) -> dist.DistInfo:
    torch.set_num_threads(1)
    tdist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    return dist.DistInfo(rank=rank, world_size=WORLD, started=True)


def tiny_model(seed: int = 0, drop_rate: float = 0.0):
    torch.manual_seed(seed)
    shape = dict(n_layers=2, emb_dim=16, n_heads=2, hidden_dim=32, context_length=32)
    return build_model(get_config("gpt2", vocab_size=VOCAB, drop_rate=drop_rate, **shape))


def collate(items):
    """Items are (ids, prompt_length); CPU tensors, the device named, as the contract says."""
    longest = max(len(ids) for ids, _ in items)
    inputs = torch.zeros(len(items), longest - 1, dtype=torch.long, device="cpu")
    targets = torch.full((len(items), longest - 1), -100, dtype=torch.long, device="cpu")
    for row, (ids, prompt) in enumerate(items):
        inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1], device="cpu")
        targets[row, prompt : len(ids) - 1] = torch.tensor(ids[prompt + 1 :], device="cpu")
    return inputs, targets


def make_data(n_train: int = 16, batch: int = 4, length: int = 12) -> LoopData:
    """Items of one length, so each process's micro-batch has the same shape; the last two
    validation items are all prompt (no supervised token)."""
    rng = random.Random(0)
    items = [([rng.randrange(1, VOCAB) for _ in range(length)] + [0], 2) for _ in range(n_train)]
    val = [([rng.randrange(1, VOCAB) for _ in range(length)] + [0], p) for p in (2, 4, 13, 13)]

    def order(epoch: int) -> list[list[int]]:
        idx = list(range(n_train))
        random.Random(f"0:{epoch}").shuffle(idx)
        return [idx[i : i + batch] for i in range(0, n_train, batch)]

    return LoopData(items, val, collate, order, [[0], [1], [2], [3]])


# ---------------------------------------------------------------------------- collectives


FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.tensor, torch.arange}
PACKAGE = f"{os.sep}instructune{os.sep}"


class HostTensorsGoElsewhere(TorchFunctionMode):
    """Within instructune's code, a tensor made without naming its device, or copied to the
    host with ``.cpu()``, lands on the meta device. With the loop on CPU such a tensor is
    then as visible as it is on a GPU, where NCCL refuses it. torch's own internals (the
    caller's file is not instructune's) are left alone."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        ours = PACKAGE in sys._getframe(1).f_code.co_filename
        if ours and func in FACTORIES and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        out = func(*args, **kwargs)
        return out.to("meta") if ours and func is torch.Tensor.cpu else out


def _collectives_worker(rank: int, port: int, out_dir: str) -> None:
    info = join_group(rank, port)
    device = torch.device("cpu")
    seen: list[str] = []

    def checked(name):
        real = getattr(tdist, name)

        def collective(tensor, *args, **kwargs):
            tensors = tensor if isinstance(tensor, list) else [tensor]
            for t in tensors:
                seen.append(f"{name}:{t.device}")
                assert t.device == device, f"{name} got a tensor on {t.device}, not {device}"
            return real(tensor, *args, **kwargs)

        return collective

    for name in TENSOR_COLLECTIVES:
        setattr(tdist, name, checked(name))
    model = tiny_model()
    data = make_data()
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.0, device=device)
    settings = LoopSettings(max_steps=2, batch_size=2, eval_every=1, eval_batches=4, quiet=True)
    # On a CPU-only machine the loop's device is the host, so a tensor made without naming the
    # device, or copied back with .cpu(), would pass unseen. Here both go to the meta device
    # instead, where the check above sees them, as NCCL would on a GPU.
    with HostTensorsGoElsewhere():
        train(model, opt, data, settings, device=device, info=info)
        val_batches = data.val_batches
        val = evaluate_loss(model, data.val_items, val_batches, collate, device=device, info=info)
    # Validation alone, on one process: batches 2 and 3 have no supervised token.
    alone = evaluate_loss(model, data.val_items, [[0], [1]], collate, device=device)
    assert val == pytest.approx(alone, rel=1e-12), (val, alone)
    assert any(s.startswith("all_reduce") for s in seen)
    Path(out_dir, f"seen-{rank}.txt").write_text("\n".join(seen))
    tdist.destroy_process_group()


@pytest.mark.slow
def test_every_collective_of_the_loop_gets_a_tensor_on_its_device(tmp_path):
    spawn(_collectives_worker, str(tmp_path))
    for rank in range(WORLD):
        seen = (tmp_path / f"seen-{rank}.txt").read_text().split()
        # Steps (token counts, loss sum, stop flag) and evaluations all went through the check.
        assert len(seen) >= 8 and set(seen) == {"all_reduce:cpu"}, seen


# ---------------------------------------------------------------------------- resume


def _resume_worker(rank: int, port: int, out_dir: str, mode: str) -> None:
    info = join_group(rank, port)
    out = Path(out_dir)
    run_dir = out / "run" if rank == 0 else None  # as the pipeline: only rank 0 writes
    device = torch.device("cpu")
    model = tiny_model(seed=5, drop_rate=0.3)
    state_mod.seed_everything(5, rank)
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.0, device=device)
    masks: list[torch.Tensor] = []

    def keep_first_mask(module, inputs, output):
        if not masks:
            masks.append((output == 0) & (inputs[0] != 0))

    model.drop_emb.register_forward_hook(keep_first_mask)
    settings = LoopSettings(epochs=2, batch_size=2, lr=1e-2, eval_every=100, quiet=True)
    progress = None
    if mode == "resume":
        ckpt = state_mod.latest_valid_checkpoint(out / "run")
        progress, _ = state_mod.load_checkpoint(ckpt, model=model, optimizer=opt)  # own rank

    def ctrl_c_after_first_epoch(epoch: int) -> None:
        if mode == "interrupt" and epoch == 0:
            signal.raise_signal(signal.SIGINT)

    try:
        train(
            model,
            opt,
            make_data(),
            settings,
            device=device,
            info=info,
            progress=progress,
            run_dir=run_dir,
            on_epoch_end=ctrl_c_after_first_epoch,
        )
    except TrainingInterrupted:
        assert mode == "interrupt"
    else:
        assert mode != "interrupt"
    torch.save({"weights": model.state_dict(), "mask": masks[0]}, out / f"{mode}-rank{rank}.pt")
    tdist.destroy_process_group()


@pytest.mark.slow
def test_two_process_resume_with_dropout_is_exact_and_ranks_draw_their_own_masks(tmp_path):
    for mode in ("whole", "interrupt", "resume"):
        out = tmp_path / ("whole" if mode == "whole" else "cut")
        out.mkdir(exist_ok=True)
        spawn(_resume_worker, str(out), mode)
    ckpts = state_mod.list_checkpoints(tmp_path / "cut" / "run")
    assert ckpts[0].name == "step-000004"  # 16 records / 4 a step: stopped after epoch 1
    assert (ckpts[0] / "rng-rank1.pt").exists()

    def load(where: str, mode: str, rank: int) -> dict:
        return torch.load(tmp_path / where / f"{mode}-rank{rank}.pt", weights_only=True)

    whole = [load("whole", "whole", r) for r in range(WORLD)]
    resumed = [load("cut", "resume", r) for r in range(WORLD)]
    for rank in range(WORLD):
        for name, value in whole[rank]["weights"].items():
            assert torch.equal(value, resumed[rank]["weights"][name]), (rank, name)
    # Same shapes, different masks: each process has its own random stream.
    assert whole[0]["mask"].shape == whole[1]["mask"].shape
    assert not torch.equal(whole[0]["mask"], whole[1]["mask"])


# ---------------------------------------------------------------------------- torchrun


def test_torchrun_with_one_process_starts_a_process_group():
    """``torchrun --nproc_per_node=1`` must take the distributed path (NCCL on one GPU)."""
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    code = (
        "import torch, torch.distributed as td\n"
        "from instructune.training import distributed as d\n"
        "info = d.init_distributed(torch.device('cpu'))\n"
        "print(info.started, info.enabled, td.is_initialized(), td.get_backend())\n"
        "d.shutdown(info)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True", "gloo"]
    # On CUDA: NCCL for GPU tensors and gloo for host ones (pickled random states).
    assert dist.process_group_backend(torch.device("cuda")) == "cpu:gloo,cuda:nccl"
    assert dist.process_group_backend(torch.device("cpu")) == "gloo"
