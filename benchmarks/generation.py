"""Generation speed: instructune's generate() against transformers' own generate().

Prints figures; it is not a test. In one run, on the same weights and prompts:

1. new tokens/s of greedy generation of N tokens (256; the end token does not stop it) at
   batch 1, for ``gpt2`` (random weights) and the embedded ``smollm2-135m-instruct``: ours and
   transformers' (a ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` loaded from our saved copy of the
   same weights);
2. the wall time to answer 64 prompts of the book's test split (records 935..1044, Alpaca
   format) with the embedded model, ``max_new_tokens`` 256, stopping at the end token: our
   batched generate() against transformers' one-prompt-at-a-time loop, and whether the greedy
   answers are identical (differences are reported with the top-two logits where they start);
3. the book's way, recomputing the whole sequence for every token (``use_cache=False``), on 4 of
   those prompts, extrapolated to 64;
4. load time and peak resident memory (after the load and one short forward, which touches every
   weight) for the gpt2-sized and the embedded weights, each in a fresh process, ours and
   transformers';
5. decoding in bf16 (``--dtype bf16``, what ``--dtype auto`` picks where the CPU has
   AVX512-BF16/AMX): batch-1 tokens/s of the embedded model against transformers' fp32
   ``generate`` (target x1.5), and the greedy answers to the whole test split (110 prompts) in
   bf16 against fp32, with the share that differ and the fp32 top-two logit gap where each
   first differs. On a CPU without bf16 instructions it prints why it is skipped
   (``--force-bf16`` runs it anyway, slowly).

Usage (from the repository root):

    .venv/bin/python benchmarks/generation.py            # the full run (~20-40 min on a laptop)
    .venv/bin/python benchmarks/generation.py --quick    # a few minutes: fewer prompts/tokens
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine_lines

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "instruction-data.json"
TEST_SPLIT = (935, 1045)  # the book's 85/10/5 split of its 1,100 records: the test part
EMBEDDED = "smollm2-135m-instruct"


# ------------------------------------------------------------------------------------------
# Machine and helpers


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB."""
    # Linux: VmHWM, which starts afresh at exec (ru_maxrss would carry the parent's peak over).
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def test_prompts(data_file: Path, count: int) -> list[str]:
    from instructune.data.prompts import format_prompt

    records = json.loads(data_file.read_text(encoding="utf-8"))[slice(*TEST_SPLIT)]
    return [format_prompt(r, "alpaca") for r in records[:count]]


def hf_model(directory: Path):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    # Our saved generation_config.json names the end token (so transformers users stop where
    # we do); here each call says whether to stop, so the model's default must not.
    model.generation_config.eos_token_id = None
    return model


def hf_generate(model, ids: list[int], *, max_new_tokens: int, eos_id: int | None, pad_id: int):
    """transformers' greedy generate for one prompt; returns the new ids (end token dropped)."""
    import torch
    from transformers import GenerationConfig

    input_ids = torch.tensor([ids])
    config = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos_id, pad_token_id=pad_id
    )
    with torch.inference_mode():
        out = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), generation_config=config
        )
    new = out[0, len(ids) :].tolist()
    if eos_id is not None and eos_id in new:
        new = new[: new.index(eos_id)]
    return new


# ------------------------------------------------------------------------------------------
# Load time and memory, each in a fresh process


def measure_load(kind: str, target: str) -> dict:
    """Runs in a child process: import everything, then time one load and read the peak RSS."""
    import torch
    import transformers  # noqa: F401  (imported before the baseline is read)

    from instructune.checkpoints import load_model

    before = peak_rss_mb()
    start = time.perf_counter()
    model = load_model(target).model if kind == "ours" else hf_model(Path(target))
    seconds = time.perf_counter() - start
    # One short forward touches every weight, so memory-mapped weights count as resident too.
    with torch.inference_mode():
        model(torch.arange(8)[None])
    params = sum(p.numel() for p in model.parameters())
    return {"seconds": seconds, "peak_mb": peak_rss_mb(), "base_mb": before, "params": params}


def load_figures(cases: list[tuple[str, str, str]]) -> list[str]:
    lines = []
    for label, kind, target in cases:
        code = [sys.executable, __file__, "--measure-load", kind, target]
        proc = subprocess.run(code, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            lines.append(f"  {label:<42} failed: {proc.stderr.strip().splitlines()[-1:]}")
            continue
        m = json.loads(proc.stdout.strip().splitlines()[-1])
        lines.append(
            f"  {label:<42} {m['seconds']:6.2f} s   peak RSS {m['peak_mb']:7.0f} MB "
            f"(+{m['peak_mb'] - m['base_mb']:.0f} MB over the imports; "
            f"{m['params'] / 1e6:.0f}M parameters)"
        )
    return lines


# ------------------------------------------------------------------------------------------
# Speed


def tokens_per_second(
    loaded, hf, prompt: str, new_tokens: int, *, repeats: int
) -> tuple[float, float, bool]:
    """Greedy batch-1 generation of exactly ``new_tokens`` (no stop token): ours, theirs.

    The two run in turns, ``repeats`` times each, and the best rate of each counts, so a
    moment of load on the machine does not decide the comparison.
    """
    from instructune.generation import encode_prompt, generate

    tok = loaded.tokenizer
    ids = encode_prompt(tok, prompt)
    generate(loaded.model, tok, [ids], max_new_tokens=4, stop_ids=[])  # warm-up
    hf_generate(hf, ids, max_new_tokens=4, eos_id=None, pad_id=tok.pad_id)
    our_rate = their_rate = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        (ours,) = generate(loaded.model, tok, [ids], max_new_tokens=new_tokens, stop_ids=[])
        our_rate = max(our_rate, len(ours.token_ids) / (time.perf_counter() - start))
        start = time.perf_counter()
        theirs = hf_generate(hf, ids, max_new_tokens=new_tokens, eos_id=None, pad_id=tok.pad_id)
        their_rate = max(their_rate, len(theirs) / (time.perf_counter() - start))
    return our_rate, their_rate, ours.token_ids == theirs


def first_difference(loaded, prompt_ids: list[int], ours: list[int], theirs: list[int]):
    """The step where two greedy answers part, and our model's top-two logits there."""
    import torch

    step = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if step is None:  # one answer is a prefix of the other: the shorter one stopped
        step = min(len(ours), len(theirs))
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([prompt_ids + ours[:step]]))[0, -1].float()
    top = torch.topk(logits, 2).values.tolist()
    return step, top[0], top[1]


def answer_prompts(loaded, hf, prompts: list[str], *, max_new_tokens: int, batch_size: int):
    from instructune.generation import encode_prompt, generate

    tok = loaded.tokenizer
    eos = tok.eos_id
    ids = [encode_prompt(tok, p) for p in prompts]
    start = time.perf_counter()
    ours = generate(
        loaded.model, tok, ids, max_new_tokens=max_new_tokens, stop_ids=[eos], batch_size=batch_size
    )
    our_time = time.perf_counter() - start
    start = time.perf_counter()
    theirs = [
        hf_generate(hf, p, max_new_tokens=max_new_tokens, eos_id=eos, pad_id=tok.pad_id)
        for p in ids
    ]
    their_time = time.perf_counter() - start
    same = sum(o.token_ids == t for o, t in zip(ours, theirs, strict=True))
    diffs = [
        (k, *first_difference(loaded, ids[k], o.token_ids, t))
        for k, (o, t) in enumerate(zip(ours, theirs, strict=True))
        if o.token_ids != t
    ]
    new_tokens = sum(len(o.token_ids) for o in ours)
    return our_time, their_time, same, diffs, new_tokens


def no_cache_time(loaded, prompts: list[str], *, max_new_tokens: int) -> tuple[float, int]:
    """The book's generate (whole sequence recomputed per token), one prompt at a time."""
    from instructune.generation import generate

    tok = loaded.tokenizer
    start = time.perf_counter()
    results = [
        generate(loaded.model, tok, [p], max_new_tokens=max_new_tokens, use_cache=False)[0]
        for p in prompts
    ]
    return time.perf_counter() - start, sum(len(r.token_ids) for r in results)


# ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts and tokens")
    parser.add_argument("--data-file", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=64,
        help="our batch size for section 2 (default 64: all the prompts in one batch)",
    )
    parser.add_argument("--prompts", type=int, help="test-split prompts to answer (default 64)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--force-bf16", action="store_true", help="section 5 on any CPU")
    parser.add_argument("--only-bf16", action="store_true", help="section 5 alone")
    parser.add_argument(
        "--measure-load", nargs=2, metavar=("KIND", "TARGET"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.measure_load:
        print(json.dumps(measure_load(*args.measure_load)))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from instructune.checkpoints import load_model, save_model

    quick = args.quick
    n_prompts = args.prompts or (8 if quick else 64)
    rate_tokens = 64 if quick else 256
    answer_tokens = 64 if quick else 256
    nocache_prompts, nocache_tokens = (2, 16) if quick else (4, 256)
    repeats = 1 if quick else 3
    prompts = test_prompts(args.data_file, n_prompts)
    print("instructune generation benchmark" + (" (--quick)" if quick else ""))
    for line in machine_lines():
        print(line)

    with tempfile.TemporaryDirectory(prefix="instructune-bench-") as tmp:
        gpt2_dir, smol_dir = Path(tmp) / "gpt2", Path(tmp) / "smollm2"
        torch.manual_seed(0)
        gpt2 = load_model("gpt2", init="random")
        save_model(gpt2_dir, gpt2.model, gpt2.tokenizer, gpt2.config, gpt2.prompt_format)
        smol = load_model(EMBEDDED)
        save_model(smol_dir, smol.model, smol.tokenizer, smol.config, smol.prompt_format)
        if args.only_bf16:
            bf16_section(smol, smol_dir, args, rate_tokens, repeats, answer_tokens)
            return 0

        print(
            f"\n1. greedy tokens/s at batch 1, {rate_tokens} new tokens (end token ignored; "
            f"best of {repeats}, ours and transformers in turns)"
        )
        for name, loaded, directory in (
            ("gpt2 (random)", gpt2, gpt2_dir),
            (EMBEDDED, smol, smol_dir),
        ):
            hf = hf_model(directory)
            ours, theirs, same = tokens_per_second(
                loaded, hf, prompts[0], rate_tokens, repeats=repeats
            )
            print(
                f"  {name:<24} ours {ours:7.1f} tok/s   transformers {theirs:7.1f} tok/s   "
                f"x{ours / theirs:.2f}   same tokens: {'yes' if same else 'NO'}"
            )
            del hf

        print(
            f"\n2. answer {n_prompts} test-split prompts with {EMBEDDED} (greedy, "
            f"max_new_tokens {answer_tokens}, stop at the end token)"
        )
        hf = hf_model(smol_dir)
        ours_s, theirs_s, same, diffs, new_tokens = answer_prompts(
            smol, hf, prompts, max_new_tokens=answer_tokens, batch_size=args.batch_size
        )
        del hf
        print(
            f"  ours, batched (batch {args.batch_size}): {ours_s:7.1f} s  "
            f"({new_tokens / ours_s:.1f} new tok/s, {new_tokens} new tokens)"
        )
        print(f"  transformers, one at a time:  {theirs_s:7.1f} s")
        target = "--quick: too few prompts to judge" if quick else "target >= 5"
        print(f"  speed-up x{theirs_s / ours_s:.2f} ({target})")
        print(f"  identical greedy answers: {same} of {n_prompts}")
        for k, step, first, second in diffs:
            print(
                f"    record {TEST_SPLIT[0] + k}: differs from step {step}; top two logits "
                f"{first:.6f} / {second:.6f} (gap {first - second:.2e}"
                f"{', a near-tie' if first - second <= 1e-4 else ''})"
            )

        print(
            f"\n3. no KV cache (the book's generate), {nocache_prompts} prompts, "
            f"max_new_tokens {nocache_tokens}"
        )
        seconds, tokens = no_cache_time(
            smol, prompts[:nocache_prompts], max_new_tokens=nocache_tokens
        )
        per_prompt = seconds / nocache_prompts
        # Two extrapolations: per prompt, and per new token of the real answers (a lower
        # bound: without a cache a token costs more the longer the answer already is).
        per_token = seconds / max(tokens, 1) * new_tokens
        print(
            f"  {seconds:.1f} s for {tokens} tokens ({tokens / seconds:.2f} tok/s); "
            f"extrapolated to {n_prompts} prompts: {per_prompt * n_prompts / 60:.1f} min by "
            f"prompts, >= {per_token / 60:.1f} min by their {new_tokens} new tokens "
            f"(vs {ours_s:.1f} s batched with the cache)"
        )

        print("\n4. load time and peak memory (each in a fresh process)")
        for line in load_figures(
            [
                ("ours: gpt2-sized, our saved safetensors", "ours", str(gpt2_dir)),
                ("transformers: the same directory", "hf", str(gpt2_dir)),
                (f"ours: {EMBEDDED} (GGUF)", "ours", EMBEDDED),
                ("transformers: our saved copy of it", "hf", str(smol_dir)),
            ]
        ):
            print(line)
        bf16_section(smol, smol_dir, args, rate_tokens, repeats, answer_tokens)
    return 0


def bf16_section(smol, smol_dir: Path, args, rate_tokens: int, repeats: int, answer_tokens: int):
    """Section 5: bf16 decoding of the embedded model against fp32 (ours) and transformers."""
    import copy

    import torch

    from instructune.generation import encode_prompt, generate
    from instructune.utils.devices import FAST_BF16_CPU_FLAGS, cpu_flags, has_fast_bf16

    print("\n5. decoding in bf16 (--dtype bf16; --dtype auto picks it where bf16 is fast)")
    if not has_fast_bf16(torch.device("cpu")) and not args.force_bf16:
        print(
            f"  skipped: this CPU has none of {', '.join(sorted(FAST_BF16_CPU_FLAGS))} "
            f"(flags read: {len(cpu_flags())}), so torch emulates bf16 matmuls, ~50x slower "
            "than fp32 (see the matmul peak above); --dtype auto stays fp32 here. "
            "--force-bf16 runs it anyway."
        )
        return
    bf16 = copy.deepcopy(smol)
    bf16.model.to(torch.bfloat16)
    hf = hf_model(smol_dir)
    prompts = test_prompts(args.data_file, TEST_SPLIT[1] - TEST_SPLIT[0])
    ours, theirs, _same = tokens_per_second(bf16, hf, prompts[0], rate_tokens, repeats=repeats)
    del hf
    print(
        f"  batch 1, {rate_tokens} new tokens: ours bf16 {ours:.1f} tok/s, transformers fp32 "
        f"{theirs:.1f} tok/s: x{ours / theirs:.2f} (target >= 1.5)"
    )
    tok = smol.tokenizer
    ids = [encode_prompt(tok, p) for p in prompts]
    options = dict(max_new_tokens=answer_tokens, stop_ids=[tok.eos_id], batch_size=16)
    a = generate(smol.model, tok, ids, **options)
    b = generate(bf16.model, tok, ids, **options)
    differ = [k for k, (x, y) in enumerate(zip(a, b, strict=True)) if x.token_ids != y.token_ids]
    print(
        f"  greedy answers to the {len(ids)} test prompts: {len(differ)} differ between bf16 "
        f"and fp32 ({len(differ) / len(ids):.0%})"
    )
    for k in differ:
        step, first, second = first_difference(smol, ids[k], a[k].token_ids, b[k].token_ids)
        print(
            f"    record {TEST_SPLIT[0] + k}: from step {step}; fp32 top two logits "
            f"{first:.4f} / {second:.4f} (gap {first - second:.3f})"
        )


if __name__ == "__main__":
    raise SystemExit(main())
