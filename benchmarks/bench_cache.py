"""Benchmark the activation cache on the bundled model. Prints numbers; asserts nothing.

    python benchmarks/bench_cache.py [--model stdlib-1l-512] [--tokens 100000]

1. caching tokens/s (tokenize + forward + capture + disk, the whole `cache_activations`)
   vs. a bare forward pass that stops at the same hook and keeps nothing: the overhead ratio
   (the target: <= 10%);
2. the shuffled reader's throughput in GB/s of float32 batches, and as a multiple of what a
   trainer consumes, measured as a ReLU dictionary train step (d_sae = 8 d_in, Adam) from sae/;
3. bytes on disk per token per hook.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

import torch


def bare_forward_tps(model, hook: str, batches: list[torch.Tensor]) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second) of forward passes that stop right after
    `hook` fires and keep nothing.

    Tokens are counted as the cache counts them (BOS positions not included), so the rates
    compare the same contexts.
    """
    from activations.hooks import _StopForward

    def stop(tensor, hook):
        raise _StopForward

    with model.hooks(fwd_hooks=[(hook, stop)]), torch.no_grad():
        wall, cpu = time.perf_counter(), time.process_time()
        for tokens in batches:
            with contextlib.suppress(_StopForward):
                model(tokens, return_type=None)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    n = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    return n / wall, n / cpu


def trainer_rows_per_s(d_in: int, batch_size: int, steps: int = 20) -> float:
    """Rows/s a ReLU dictionary (d_sae = 8 d_in) trains at: forward, MSE + L1, backward, Adam."""
    from sae.base import DictionaryConfig, build

    sae = build(DictionaryConfig("relu", d_in=d_in, d_sae=8 * d_in))
    for p in sae.parameters():
        torch.nn.init.normal_(p, std=0.02)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    x = torch.randn(batch_size, d_in)

    def step() -> None:
        out = sae(x)
        loss = (out.x_hat - x).pow(2).sum(-1).mean() + 1e-3 * out.feature_acts.sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="stdlib-1l-512")
    parser.add_argument("--hook", default="blocks.0.mlp.hook_post")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--context-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4096, help="rows per reader batch")
    parser.add_argument("--workdir", default=None, help="where the temporary cache goes")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--rounds", type=int, default=3, help="best of N, interleaved")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from activations.cache import CacheConfig, cache_activations
    from activations.model import load_model
    from activations.reader import CachedActivations
    from activations.text import TextConfig, token_batches

    model = load_model(args.model)
    text = TextConfig(context_size=args.context_size)
    n_contexts = -(-args.tokens // (args.context_size - 1))  # what the cache runs
    batches, have = [], 0
    tok_wall, tok_cpu = time.perf_counter(), time.process_time()
    for tokens in token_batches(text, model.tokenizer):
        batches.append(tokens[: n_contexts - have])
        have += len(batches[-1])
        if have == n_contexts:
            break
    tok_wall, tok_cpu = time.perf_counter() - tok_wall, time.process_time() - tok_cpu
    tokenize = (have * (args.context_size - 1) / tok_wall, have * (args.context_size - 1) / tok_cpu)
    print(f"model {args.model}, hook {args.hook}, {torch.get_num_threads()} torch thread(s)")
    print(f"machine load (1 min): {Path('/proc/loadavg').read_text().split()[0]}")

    bare_forward_tps(model, args.hook, batches[:2])  # warm-up
    some = batches[: max(1, len(batches) // 4)]
    full = sum(b.shape[0] * (b.shape[1] - 1) for b in some) / _timed(
        lambda: [model(b, return_type=None) for b in some]
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:

        def cache(name: str, dtype: str, hooks: tuple[str, ...]):
            cfg = CacheConfig(
                out=Path(tmp) / name,
                model=args.model,
                hooks=hooks,
                text=text,
                dtype=dtype,  # type: ignore[arg-type]
                max_tokens=args.tokens,
            )
            cpu = time.process_time()
            result = cache_activations(cfg, model=model)
            cpu = time.process_time() - cpu
            return (result.n_tokens / result.seconds, result.n_tokens / cpu), result

        # Interleaved rounds, best of each: on a shared machine the load drifts between runs.
        # CPU seconds (all threads of this process) are also reported: under heavy load they
        # measure the work done rather than the share of the machine obtained.
        bare, cached, f32_tps = (0.0, 0.0), (0.0, 0.0), (0.0, 0.0)
        for r in range(args.rounds):
            bare = _best(bare, bare_forward_tps(model, args.hook, batches))
            tps, bf16 = cache(f"bf16-{r}", "bfloat16", (args.hook,))
            cached = _best(cached, tps)
            tps, f32 = cache(f"f32-{r}", "float32", (args.hook,))
            f32_tps = _best(f32_tps, tps)
        two_tps, _ = cache("two", "bfloat16", (args.hook, "blocks.0.hook_resid_post"))
        rows = {
            "bfloat16": (cached, folder_bytes(bf16.hook_dirs[args.hook]) / bf16.n_tokens),
            "float32": (f32_tps, folder_bytes(f32.hook_dirs[args.hook]) / f32.n_tokens),
        }

        # The writer thread's work per token (statistics, cast, file write), measured alone.
        from activations.cache_format import write_safetensors
        from activations.cache_writer import shard_statistics

        rows_f32 = CachedActivations(f32.hook_dirs[args.hook], batch_size=65536, prefetch=0)
        x = torch.cat(list(rows_f32))
        cpu = time.process_time()
        shard_statistics(x)
        write_safetensors(Path(tmp) / "w.safetensors", {"activations": x.bfloat16()}, {})
        writer_us = (time.process_time() - cpu) / len(x) * 1e6

        reader = CachedActivations(bf16.hook_dirs[args.hook], batch_size=args.batch_size, seed=0)
        start = time.perf_counter()
        n = sum(batch.shape[0] for batch in reader)
        read_seconds = time.perf_counter() - start
        d_in = reader.d_in
        gbps = n * d_in * 4 / read_seconds / 1e9
        reader_rps = n / read_seconds
    train_rps = trainer_rows_per_s(d_in, args.batch_size)

    print()
    print(f"{'measure':<52} {'tokens/s (wall)':>16} {'tokens/CPU-s':>14}")
    print(f"{'tokenize + pack only (no model)':<52} {tokenize[0]:>16,.0f} {tokenize[1]:>14,.0f}")
    print(f"{'full forward (to logits)':<52} {full:>16,.0f} {'':>14}")
    print(f"{'bare forward stopped at the hook':<52} {bare[0]:>16,.0f} {bare[1]:>14,.0f}")
    for dtype, (tps, _) in rows.items():
        print(f"{f'sae cache, {dtype}':<52} {tps[0]:>16,.0f} {tps[1]:>14,.0f}")
        over = (bare[0] / tps[0] - 1, bare[1] / tps[1] - 1)
        print(f"{f'  overhead vs bare forward ({dtype})':<52} {over[0]:>16.1%} {over[1]:>14.1%}")
    print(
        f"{'sae cache, 2 hooks in one pass (bf16)':<52} {two_tps[0]:>16,.0f} {two_tps[1]:>14,.0f}"
    )
    print()
    print("CPU microseconds per token (where the cache's extra work goes):")
    print(f"{'  bare forward to the hook':<52} {1e6 / bare[1]:>16.2f}")
    print(f"{'  tokenize + pack (background thread)':<52} {1e6 / tokenize[1]:>16.2f}")
    print(f"{'  statistics + bf16 cast + file write (writer thread)':<52} {writer_us:>16.2f}")
    print(f"{'  whole cache run (bf16), all threads':<52} {1e6 / cached[1]:>16.2f}")
    print()
    for dtype, (_, per_token) in rows.items():
        print(
            f"{f'bytes on disk per token per hook ({dtype}, d_in {d_in})':<52} {per_token:>16.1f}"
        )
    print(f"{'shuffled reader (bf16 cache -> float32 batches), GB/s':<52} {gbps:>16.2f}")
    print(f"{'shuffled reader, rows/s':<52} {reader_rps:>16,.0f}")
    print(
        f"{f'relu SAE train step (d_sae {8 * d_in}, batch {args.batch_size}), rows/s':<52} "
        f"{train_rps:>16,.0f}"
    )
    print(f"{'reader throughput / trainer consumption':<52} {reader_rps / train_rps:>15.1f}x")


def _best(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return max(a[0], b[0]), max(a[1], b[1])


def _timed(fn) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
