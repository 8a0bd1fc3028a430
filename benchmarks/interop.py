"""Export interop figures on the embedded model: llama.cpp against instructune, all demo prompts.

Prints figures; it is not a test (``tests/test_export_interop.py`` checks a few prompts in CI
where llama-cpp-python is installed; ``make test-interop`` installs it). For each GGUF type
(f32, q8_0) of the embedded SmolLM2-135M-Instruct, exported with its chat format:

1. how many of the demo test prompts (and the export tests' tokenizer texts) llama.cpp's
   tokenizer turns into our token ids;
2. the share of the 53 demo test prompts whose greedy answers (16 new tokens) are equal in
   llama.cpp and here, with our logit margin between the two tokens where each difference
   starts (a near-tie when it is small);
3. the top-1 agreement over every prompt position between our fp32 model and the GGUF read
   back by the ``gguf`` package into our model.

Usage (from the repository root, with llama-cpp-python installed):

    .venv/bin/python benchmarks/interop.py
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from machine import machine_lines

TESTS = Path(__file__).resolve().parents[1] / "tests"


def main() -> int:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed (make test-interop installs it): skipped")
        return 0
    import torch

    sys.path.insert(0, str(TESTS))  # the interop tests' llama.cpp helpers, one copy of them
    from test_export_gguf import TEXTS, demo_test_records
    from test_export_interop import compare_greedy, open_llama

    from instructune.checkpoints import load_model
    from instructune.checkpoints.gguf_export import export_gguf
    from instructune.data.prompts import format_prompt, prompt_format_for

    for line in machine_lines():
        print(line)
    loaded = load_model("smollm2-135m-instruct", log=None)
    loaded.prompt_format = prompt_format_for(loaded.tokenizer, "chat")
    template = loaded.tokenizer.chat_template
    prompts = [format_prompt(r, "chat", chat_template=template) for r in demo_test_records()]
    texts = prompts + TEXTS
    with tempfile.TemporaryDirectory(prefix="instructune-interop-") as tmp:
        for gguf_type in ("f32", "q8_0"):
            started = time.perf_counter()
            path = export_gguf(loaded, Path(tmp) / gguf_type, gguf_type=gguf_type, name="m").gguf
            llm = open_llama(path, 1024)
            same_ids = sum(
                llm.tokenize(t.encode(), add_bos=False, special=True) == loaded.tokenizer.encode(t)
                for t in texts
            )
            share, notes = compare_greedy(loaded, llm, prompts)
            print(
                f"{gguf_type}: token ids equal llama.cpp's for {same_ids}/{len(texts)} texts; "
                f"greedy answers equal on {share:.1%} of {len(prompts)} prompts "
                f"({time.perf_counter() - started:.0f} s)"
            )
            for note in notes:
                print(f"  differs at {note}")
            back = load_model(path, log=None)
            agree = total = 0
            for prompt in prompts:
                ids = torch.tensor([loaded.tokenizer.encode(prompt)])
                with torch.no_grad():
                    ours = loaded.model(ids)[0].argmax(-1)
                    theirs = back.model(ids)[0].argmax(-1)
                agree += int((ours == theirs).sum())
                total += ours.numel()
            print(
                f"{gguf_type}: read back by the gguf package, top-1 agreement with our fp32 "
                f"over {total} positions: {agree / total:.4f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
