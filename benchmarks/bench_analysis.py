"""Analysis throughput vs. the bare forward + encode pass, in the same run (the goal:
analysis >= 80% of the bare tokens/s).

Both loops run over the SAME pre-tokenized batches (tokenization excluded from both), the
bare loop does model forward (stopping at the hook) + dictionary encode, the analysis loop
adds FeatureAccumulator.update (histograms, streaming top-N and quantile sample). The two
are timed batch by batch, interleaved, to even out load from other processes.

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

from activations.hooks import ActivationCapture
from activations.model import BUNDLED_DIR, load_model
from activations.text import TextConfig, context_batches
from analysis.accumulator import AnalysisConfig, FeatureAccumulator
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

    def forward_encode(cap: ActivationCapture, tokens: torch.Tensor) -> torch.Tensor:
        return d.encode(cap(tokens)[hook])

    # Interleaved per batch: the bare pass and the analysis pass of the same batch run back
    # to back, so both see the same load from other processes on a shared machine.
    t_bare = [0.0] * args.repeats
    t_analysis = [0.0] * args.repeats
    with ActivationCapture(model, [hook]) as cap:
        forward_encode(cap, batches[0].tokens)  # warm-up
        for r in range(args.repeats):
            acc = FeatureAccumulator(d.d_sae, cfg)
            for b in batches:
                t0 = time.perf_counter()
                forward_encode(cap, b.tokens)
                t1 = time.perf_counter()
                acc.update(b.tokens, b.sequence, forward_encode(cap, b.tokens))
                t2 = time.perf_counter()
                t_bare[r] += t1 - t0
                t_analysis[r] += t2 - t1
    print(f"model: {model_desc}\ndictionary: {dict_desc}, hook {hook}")
    print(f"{n_tokens:,} tokens per run, {len(batches)} batches of {args.batch_size}x"
          f"{args.context_size}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"{'run':>4} {'bare tok/s':>12} {'analysis tok/s':>15} {'ratio':>7}")
    for r in range(args.repeats):
        b, a = n_tokens / t_bare[r], n_tokens / t_analysis[r]
        print(f"{r:>4} {b:>12,.0f} {a:>15,.0f} {a / b:>7.1%}")
    b, a = n_tokens * args.repeats / sum(t_bare), n_tokens * args.repeats / sum(t_analysis)
    print(f" all {b:>12,.0f} {a:>15,.0f} {a / b:>7.1%}  (goal >= 80%)")


if __name__ == "__main__":
    main()
