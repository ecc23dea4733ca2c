"""Analysis throughput vs. the bare forward + encode pass, in the same run (issue 6 goal:
analysis >= 80% of the bare tokens/s).

Both loops run over the SAME pre-tokenized batches (tokenization excluded from both), the
bare loop does model forward (stopping at the hook) + dictionary encode, the analysis loop
adds FeatureAccumulator.update (histograms, streaming top-N and quantile sample). Runs
alternate to even out noise from other processes.

    python benchmarks/bench_analysis.py                     # bundled model if present
    python benchmarks/bench_analysis.py --dict runs/my_dict --batches 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from activations.analysis import AnalysisConfig, FeatureAccumulator
from activations.hooks import ActivationCapture
from activations.model import BUNDLED_DIR, load_model
from activations.text import TextConfig, context_batches
from sae.base import DictionaryConfig, build
from sae.io import load_dictionary

HOOK = "blocks.0.mlp.hook_post"


def get_model(tmp: Path):
    if (BUNDLED_DIR / "model.safetensors").is_file():
        return load_model("bundled"), "bundled stdlib-1l-512"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for tests/
    from tests.conftest import make_tiny_lm_dir

    # Same shape as the bundled model (1 layer, d_model 128, 512 MLP neurons), random weights.
    path = make_tiny_lm_dir(tmp / "lm", d_model=128, n_inner=512, n_ctx=128)
    return load_model(str(path)), "random GPT-2 1L d_model 128 d_mlp 512 (bundled not built)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--dict", help="a trained dictionary (default: random topk k=32)")
    ap.add_argument("--d-sae", type=int, default=4096)
    ap.add_argument("--batches", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--context-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory() as tmp:
        model, model_desc = get_model(Path(tmp))
    if args.dict:
        d = load_dictionary(args.dict)
        dict_desc = f"{args.dict} ({d.cfg.architecture}, d_sae {d.d_sae})"
    else:
        torch.manual_seed(0)
        d = build(DictionaryConfig(architecture="topk", d_in=int(model.cfg.d_mlp),
                                   d_sae=args.d_sae, hook_name=HOOK, k=32))  # fmt: skip
        torch.nn.init.normal_(d.W_enc, std=0.05)
        d.W_dec.data.copy_(d.W_enc.data.T)
        dict_desc = f"random topk k=32, d_sae {args.d_sae}"
    hook = d.cfg.hook_name or HOOK
    text = TextConfig(context_size=args.context_size, batch_size=args.batch_size, split="train")
    batches = list(
        context_batches(text, model.tokenizer, max_contexts=args.batches * args.batch_size)
    )
    n_tokens = sum(b.tokens.numel() for b in batches)
    cfg = AnalysisConfig(n_tokens=n_tokens)

    def bare() -> float:
        t0 = time.perf_counter()
        with ActivationCapture(model, [hook]) as cap:
            for b in batches:
                d.encode(cap(b.tokens)[hook])
        return n_tokens / (time.perf_counter() - t0)

    def analysis() -> float:
        acc = FeatureAccumulator(d.d_sae, cfg)
        t0 = time.perf_counter()
        with ActivationCapture(model, [hook]) as cap:
            for b in batches:
                acc.update(b.tokens, b.sequence, d.encode(cap(b.tokens)[hook]))
        return n_tokens / (time.perf_counter() - t0)

    bare()  # warm-up
    rows = []
    for _ in range(args.repeats):
        rows.append((bare(), analysis()))
    print(f"model: {model_desc}\ndictionary: {dict_desc}, hook {hook}")
    print(f"{n_tokens:,} tokens per run, {len(batches)} batches of {args.batch_size}x"
          f"{args.context_size}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'run':>4} {'bare tok/s':>12} {'analysis tok/s':>15} {'ratio':>7}")
    for i, (b, a) in enumerate(rows):
        print(f"{i:>4} {b:>12,.0f} {a:>15,.0f} {a / b:>7.1%}")
    best_b, best_a = max(r[0] for r in rows), max(r[1] for r in rows)
    print(f"best {best_b:>12,.0f} {best_a:>15,.0f} {best_a / best_b:>7.1%}  (goal >= 80%)")


if __name__ == "__main__":
    main()
