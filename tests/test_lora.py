"""LoRA as a model transform: identity at step 0, a frozen base, merge, and LoRA runs end to end
(grad accumulation, activation checkpointing, dropout, resume, torchrun, merge CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from instructune.models import build_model, get_config
from instructune.models.lora import (
    LoraSettings,
    apply_lora,
    count_parameters,
    lora_disabled,
    lora_modules,
    merge_lora,
    parse_targets,
)

SHAPES = {
    "gpt2": dict(n_layers=2, emb_dim=32, n_heads=2, hidden_dim=64, context_length=64),
    "smollm2-135m": dict(
        n_layers=2, emb_dim=32, n_heads=4, n_kv_heads=2, hidden_dim=48, context_length=64
    ),
}
IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79], [2, 7, 1, 8, 28, 18, 28, 45]])


def tiny(name: str, **overrides):
    torch.manual_seed(0)
    return build_model(get_config(name, vocab_size=100, **SHAPES[name], **overrides))


def randomise_adapters(model, std: float = 0.02) -> None:
    """As after training: B non-zero, so the adapters change the outputs."""
    torch.manual_seed(7)
    with torch.no_grad():
        for _, module in lora_modules(model):
            module.lora_B.normal_(std=std)


@pytest.mark.parametrize("name", list(SHAPES))
def test_zero_update_at_step_zero_then_only_the_adapters_train(name):
    from instructune.training.optim import make_optimizer

    model = tiny(name).train()  # training mode: the adapters' dropout is on
    before = model(IDS)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, LoraSettings(rank=4, alpha=8, dropout=0.2))
    assert torch.equal(model(IDS), before)  # B = 0: identical outputs, not merely close
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)

    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1, device=torch.device("cpu"))
    assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)
    logits = model(IDS)
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten()).backward()
    opt.step()
    assert len(opt.state) == len(trainable)  # AdamW moments for the adapters alone
    after = model.state_dict()
    for key, value in base.items():  # every base tensor bit for bit (weight decay included)
        wrapped = key.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        assert torch.equal(after.get(key, after.get(wrapped)), value), key
    assert not torch.equal(model.eval()(IDS), before.detach())


@pytest.mark.parametrize("name", list(SHAPES))
def test_merge_equals_the_adapted_model_and_the_head_goes_to_an_untied_lm_head(name):
    model = tiny(name)
    embedding = model.tok_emb.weight.detach().clone()
    base_logits = model(IDS).detach()
    apply_lora(model, LoraSettings(rank=4, alpha=16))
    randomise_adapters(model)
    with torch.no_grad():
        adapted = model(IDS)
        with lora_disabled(model):  # switched off: the base exactly
            assert torch.equal(model(IDS), base_logits)
        assert (adapted - base_logits).abs().max() > 1e-3
    merge_lora(model)
    assert not list(lora_modules(model))
    assert model.cfg.tie_embeddings is False and model.out_head is not None
    assert torch.equal(model.tok_emb.weight, embedding)  # the lookup is unchanged
    assert not torch.equal(model.out_head.weight, embedding)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), adapted, atol=1e-5, rtol=0)


def test_the_head_adapter_reuses_its_sum_until_a_parameter_changes():
    model = tiny("gpt2")
    apply_lora(model, LoraSettings(rank=2, targets=("head",)))
    head = model.out_head
    with torch.no_grad():
        first = model.output_weight
        assert model.output_weight is first  # decoding: computed once
        head.lora_B.add_(0.5)  # an optimizer step changes it in place
        second = model.output_weight
    assert second is not first
    torch.testing.assert_close(second, model.tok_emb.weight + head.delta_weight())


def test_gpt2_medium_rank_16_everywhere_against_the_books_count():
    cfg = get_config("gpt2-medium")
    model = apply_lora(build_model(cfg, device="meta"), LoraSettings(rank=16))
    trainable, total = count_parameters(model)
    r, d, layers = 16, cfg.emb_dim, cfg.n_layers
    # The book: separate query/key/value layers (3 adapters of r*(d+d)), out_proj, the two
    # feed-forward layers and an untied out_head, every one an adapter of r*(in+out).
    book = layers * r * (4 * (d + d) + 2 * (d + cfg.hidden_dim)) + r * (d + cfg.vocab_size)
    assert book == 7_898_384
    # Ours (and PEFT's on HF GPT-2): q/k/v are one c_attn layer with one adapter of r*(d+3d).
    assert trainable == book - layers * r * (3 * (d + d) - (d + 3 * d)) == 7_111_952
    assert total == 354_823_168 + trainable


def test_settings_and_targets_are_checked():
    assert parse_targets("all") == ("attn", "mlp", "head")
    assert parse_targets("head, attn") == ("attn", "head")
    with pytest.raises(ValueError, match="subset"):
        parse_targets("attn,embedding")
    with pytest.raises(ValueError, match="rank"):
        LoraSettings(rank=0)
    assert LoraSettings(rank=8).scaling == 1.0 and LoraSettings(rank=8, alpha=32).scaling == 4.0
    model = apply_lora(tiny("gpt2"), LoraSettings(rank=2, targets=("mlp",)))
    assert [p for p, _ in lora_modules(model)] == [f"blocks.{i}.ff.{n}" for i in (0, 1)
                                                   for n in ("fc", "proj")]  # fmt: skip
    with pytest.raises(ValueError, match="already"):
        apply_lora(model, LoraSettings(rank=2))


# ---------------------------------------------------------------------------- runs


# 4 steps of rank-4 LoRA on a tiny GPT-2 with grad accumulation (global batch 4) and activation
# checkpointing; a checkpoint every step. As flags too, for the torchrun run.
LORA_RUN = dict(
    lora_rank=4, lora_alpha=8.0, grad_accum=2, batch_size=2, max_steps=4,
    activation_checkpointing=True, lr=1e-2, eval_every=2, checkpoint_every=1,
)  # fmt: skip


def lora_cfg(out: Path, **settings):
    return tiny_config(out, **{**LORA_RUN, **settings})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    from instructune.pipeline import run_finetune

    out = tmp_path_factory.mktemp("lora") / "run"
    run_finetune(lora_cfg(out))
    return out


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def test_a_lora_run_saves_a_peft_adapter_and_resumes_to_the_same_adapter(lora_run, tmp_path):
    from instructune.checkpoints import load_model
    from instructune.config import apply_overrides
    from instructune.pipeline import load_run_config, run_finetune

    run = json.loads((lora_run / "run.json").read_text())
    assert run["lora"]["rank"] == 4 and run["lora"]["targets"] == ["attn", "mlp", "head"]
    assert run["lora"]["trainable_parameters"] < run["lora"]["total_parameters"] / 5
    config = json.loads((lora_run / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((lora_run / "base").resolve())
    assert not (lora_run / "model.safetensors").exists()  # the adapter alone
    # The base saved beside it is the random init the adapter was trained on.
    ckpt = load_file(str(lora_run / "checkpoints" / "step-000004" / "model.safetensors"))
    base = load_model(lora_run / "base", log=None).model.state_dict()
    assert torch.equal(ckpt["blocks.1.attn.qkv.base.weight"], base["blocks.1.attn.qkv.weight"])

    # Stop after 2 steps, resume to 4: the adapter of the uninterrupted run, bit for bit.
    cut = tmp_path / "cut"
    run_finetune(lora_cfg(cut, max_steps=2))
    run_finetune(apply_overrides(load_run_config(cut), {"max_steps": 4}), resume=True)
    whole, resumed = adapter_tensors(lora_run), adapter_tensors(cut)
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key

    # --model ADAPTER trains that adapter further (with other --lora-* settings: refused).
    from instructune.config import ConfigError

    more = lora_cfg(tmp_path / "more", model=str(lora_run), init="pretrained",
                    model_overrides={}, max_steps=1, lora_rank=None)  # fmt: skip
    run_finetune(more)
    again = json.loads((tmp_path / "more" / "adapter_config.json").read_text())
    assert again["base_model_name_or_path"] == config["base_model_name_or_path"]
    assert adapter_tensors(tmp_path / "more").keys() == whole.keys()
    with pytest.raises(ConfigError, match="leave out --lora"):
        run_finetune(more.model_copy(update={"lora_rank": 8, "out": str(tmp_path / "m2")}))


def test_merge_cli_writes_a_plain_model_with_the_adapted_logits(lora_run, tmp_path):
    from instructune.checkpoints import load_model
    from instructune.cli.main import main

    assert main(["merge", str(lora_run), "--out", str(tmp_path / "merged")]) == 0
    adapted = load_model(lora_run, log=None)
    merged = load_model(tmp_path / "merged", log=None)
    base = load_model(lora_run / "base", log=None)
    assert not list(lora_modules(merged.model)) and merged.config.tie_embeddings is False
    assert merged.prompt_format == adapted.prompt_format
    ids = torch.tensor([[464, 3290, 286, 4881, 318, 50256, 13]])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), adapted.model(ids), atol=1e-5, rtol=0)
    # The head adapter went into lm_head; the embedding is the base's, unchanged.
    hf = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert torch.equal(hf["transformer.wte.weight"], base.model.tok_emb.weight)
    assert not torch.equal(hf["lm_head.weight"], hf["transformer.wte.weight"])
    # Its card says it is merged, from the adapter's base.
    card = (tmp_path / "merged" / "README.md").read_text(encoding="utf-8")
    assert "merged with instructune" in card
    assert f'base_model: "{(lora_run / "base").resolve()}"' in card
    # Merging into a model directory again is refused without --overwrite.
    assert main(["merge", str(lora_run), "--out", str(tmp_path / "merged")]) == 1


def _lora_loop(world: int, out: Path, info=None) -> None:
    """2 LoRA steps of the training loop (global batch 4, activation checkpointing, the head
    adapter included) on the distributed tests' tiny data; the adapter saved by process 0."""
    from test_training_distributed import make_data, tiny_model

    from instructune.models.lora import adapter_state_dict
    from instructune.training.loop import LoopSettings, make_optimizer, train

    model = tiny_model(seed=3)
    apply_lora(model, LoraSettings(rank=2, alpha=4, targets=("attn", "mlp", "head")))
    model.gradient_checkpointing = True
    device = torch.device("cpu")
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1, device=device)
    settings = LoopSettings(max_steps=2, batch_size=2, grad_accum=2 // world, lr=1e-2,
                            eval_every=100, quiet=True)  # fmt: skip
    train(model, opt, make_data(), settings, device=device, info=info)
    if info is None or info.rank == 0:
        torch.save({k: v.detach() for k, v in adapter_state_dict(model).items()}, out)


def _lora_worker(rank: int, port: int, out_dir: str) -> None:
    from test_training_distributed import join_group

    info = join_group(rank, port)
    _lora_loop(2, Path(out_dir) / "two.pt", info)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_train_the_adapter_of_one_process(tmp_path):
    """2 processes x micro-batch 2 against 1 process x 2 accumulated micro-batches of 2: the
    same global batches, so the same adapter up to float rounding (DDP reduces the adapters'
    gradients; the frozen base has none)."""
    from test_training_distributed import spawn

    spawn(_lora_worker, str(tmp_path))
    _lora_loop(1, tmp_path / "one.pt")
    one = torch.load(tmp_path / "one.pt", weights_only=True)
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    assert one.keys() == two.keys() and any(v.abs().sum() > 0 for k, v in one.items()
                                            if k.endswith("lora_B"))  # fmt: skip
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=1e-6, rtol=1e-5)
