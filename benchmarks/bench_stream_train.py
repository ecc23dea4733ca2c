"""Training straight from the model against training on a cache, side by side: the same
dictionary on the same hook of the bundled model, tokens/s of each and the fraction of the
training time the trainer waits for its next batch.

The stream runs the model on a producer thread (activations/stream.py), so the forward pass
overlaps the dictionary's steps where there are cores for both; the cached run reads rows
written by `sae cache` first, whose time is reported too (cache + train is what a single run
costs with a cache).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_stream_train.py
    .venv/bin/python benchmarks/bench_stream_train.py --tokens 1000000 --d-sae 4096
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from activations.cache import CacheConfig, cache_activations
from activations.model import BUNDLED_MODEL, load_model
from activations.reader import CachedActivations
from activations.stream import StreamedActivations
from activations.text import TextConfig
from training.config import DictionaryShape, EvalConfig, LoggingConfig, ObjectiveConfig, TrainConfig
from training.distributed import DistInfo
from training.stream_source import SharedStream, StreamConfig
from training.trainer import Trainer


class Timed:
    """A batch source that adds up how long its consumer waited in `next()`."""

    def __init__(self, source: Any) -> None:
        self.source = source
        self.wait = 0.0

    def __iter__(self) -> Iterator[torch.Tensor]:
        it = iter(self.source)
        while True:
            t0 = time.perf_counter()
            x = next(it, None)
            self.wait += time.perf_counter() - t0
            if x is None:
                return
            yield x


def train(cfg: TrainConfig, d_in: int, source: Any) -> tuple[float, float, int]:
    """(seconds, seconds waiting for data, tokens) of one training run."""
    timed = Timed(source)
    t0 = time.perf_counter()
    result = Trainer(cfg, d_in).fit(timed)
    return time.perf_counter() - t0, timed.wait, result.tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--hook", default="blocks.0.mlp.hook_post")
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    model = load_model(BUNDLED_MODEL)
    text = TextConfig()
    scfg = StreamConfig()

    def cfg(out: Path) -> TrainConfig:
        return TrainConfig(
            total_tokens=args.tokens,
            batch_size=args.batch,
            out_dir=out,
            device="cpu",
            checkpoint_every_steps=0,
            dictionary=DictionaryShape(d_sae=args.d_sae),
            objective=ObjectiveConfig(name="topk_auxk", k=args.k),
            eval=EvalConfig(loss_recovered=False),
            logging=LoggingConfig(plots=False, progress=False, log_every_steps=10),
        )

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        stream = StreamedActivations(
            model, [args.hook], text, args.batch, mix_passes=scfg.mix_passes(),
            prefetch=scfg.prefetch_batches,
        )  # fmt: skip
        shared = SharedStream(stream, DistInfo())
        d_in = stream.d_ins[args.hook]
        s_time, s_wait, s_tokens = train(cfg(root / "stream"), d_in, shared.views[args.hook])
        shared.close()

        t0 = time.perf_counter()
        cache_activations(
            CacheConfig(out=root / "cache", hooks=(args.hook,), text=text, dtype="float32",
                        max_tokens=args.tokens, device="cpu"),
            model=model,
        )  # fmt: skip
        c_cache = time.perf_counter() - t0
        reader = CachedActivations(root / "cache", args.hook, batch_size=args.batch, drop_last=True)
        c_time, c_wait, c_tokens = train(cfg(root / "cached"), d_in, reader)

    print(
        f"bundled model, {args.hook} (d_in {d_in}), topk k={args.k} d_sae {args.d_sae}, "
        f"batch {args.batch}, {torch.get_num_threads()} torch thread(s)"
    )
    print(f"{'':28}{'tokens':>9}{'seconds':>9}{'tokens/s':>10}{'waiting':>9}")
    rows = [
        ("stream: model + train", s_tokens, s_time, s_wait),
        ("cached: train only", c_tokens, c_time, c_wait),
        ("cached: sae cache", args.tokens, c_cache, 0.0),
        ("cached: cache + train", c_tokens, c_cache + c_time, c_wait),
    ]
    for name, n, sec, wait in rows:
        print(f"{name:28}{n:>9,}{sec:>9.1f}{n / sec:>10,.0f}{wait / sec:>9.0%}")
    print(
        f"stream / cached training: {(s_tokens / s_time) / (c_tokens / c_time):.2f}x tokens/s; "
        f"stream / (cache + train): {(s_tokens / s_time) / (c_tokens / (c_cache + c_time)):.2f}x"
    )


if __name__ == "__main__":
    main()
