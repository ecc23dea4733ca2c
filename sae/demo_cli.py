"""`sae demo`: the main job end to end on the bundled model and corpus.

    cache (MLP activations) -> train relu+resampling and topk side by side -> analyze both
    -> compare them (feature splitting) -> report -> serve the web feature browser

The demo composes the public subcommands (`sae cache`, `sae train`, `sae analyze`,
`sae compare`, `sae serve`) exactly as a user would type them, so it knows none of their
internals and each step's output folder is the one those commands document. Every step is
resumable: run it again after an interruption and finished steps are skipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sae.dataclass_cli import add_dataclass_args, dataclass_from_args
from sae.errors import UserError
from sae.jobs import TrainJob, run_parallel

logger = logging.getLogger(__name__)

# The two dictionaries: the "Towards Monosemanticity" recipe and a TopK dictionary.
MEMBERS = ("relu_l1", "topk_auxk")


@dataclass
class DemoConfig:
    """What `sae demo` runs; defaults reproduce the README's numbers."""

    out: Path = Path("demo_out")
    """Folder for every artefact (cache, run, feature stores, report)."""
    model: str = "stdlib-1l-512"
    """Language model: the bundled one-layer, 512-neuron-MLP model by default."""
    hook: str = "blocks.0.mlp.hook_post"
    """Hook to cache and train on (the 512 MLP neurons, as in Towards Monosemanticity)."""
    tokens: int = 4_500_000
    """Tokens of activations of the training split to cache: more than either dictionary
    trains on, so neither sees a token twice (bf16: 1 KiB a token)."""
    context_size: int = 128
    """Tokens per context (BOS included) when caching and analysing."""
    relu_tokens: int = 2_000_000
    """Tokens the relu dictionary trains on. The two dictionaries train at once, a process
    and half the cores each: on 2 CPU cores with bf16 matmuls, both finish in about 7 minutes
    (README)."""
    topk_tokens: int = 3_500_000
    """Tokens the topk dictionary trains on (a TopK step is cheaper than a relu one)."""
    kl_finetune_tokens: int = 200_000
    """Then each trains this many tokens with the model's KL added to its loss (end-to-end
    fine-tuning, Braun et al. 2024; 0: none)."""
    d_sae: int = 4096
    """Features per dictionary (8x the 512 neurons: Anthropic's smallest run)."""
    k: int = 32
    """Active features per token of the topk dictionary."""
    l1_coefficient: float = 5.0
    """Starting L1 coefficient of the relu dictionary (then steered toward target_l0)."""
    target_l0: float = 20.0
    """Mean active features per token (on training batches) the relu dictionary's L1
    coefficient is steered to; after the KL phase its held-out L0 comes out a few higher."""
    target_l0_rate: float = 0.003
    """Step size of that steering (a slow controller kills fewer features than a fast one)."""
    resample_count: int = 10
    """Resampling points of the relu dictionary, spread over the first resample_stop of it."""
    resample_stop: float = 0.9
    """Fraction of training up to which the relu dictionary is resampled."""
    resample_encoder_scale: float = 1.0
    """A resampled feature's encoder row, as a multiple of the alive features' mean norm."""
    resample_fire_fraction: float = 0.005
    """A resampled feature's bias makes it fire on this fraction of the scored inputs."""
    dead_tokens: int = 200_000
    """topk: a latent silent this many tokens is dead and trained by AuxK (a short run)."""
    batch_size: int = 1024
    """Activations per training step."""
    lr: float = 2e-3
    """Peak learning rate (short runs want a larger one than the trainer's default)."""
    autocast: Literal["none", "bf16", "auto"] = "auto"
    """none, bf16, or auto: bf16 where the machine multiplies bf16 in hardware."""
    lazy_adam: bool = True
    """Move a feature's weights only on steps where it fired (fewer features die)."""
    eval_tokens: int = 200_000
    """Held-out tokens the dictionaries are evaluated on: whole contexts of the corpus's
    validation split (files not in the training split), cached by a second `sae cache`.
    About the same text as `sae analyze` reads (the split's first contexts), so the report's
    "never fired" are close to the features the browser lists with frequency 0."""
    analysis_tokens: int = 200_000
    """Validation tokens run through model and dictionary by `sae analyze`."""
    compare_tokens: int = 30_000
    """Tokens for the activation correlations of `sae compare` (d_sae x d_sae per token)."""
    show: int = 3
    """Features of each dictionary printed in the report."""
    serve: bool = True
    """Serve the web feature browser at the end (Ctrl-C stops it)."""
    host: str = "127.0.0.1"
    """Address to serve on."""
    port: int = 8000
    """Port to serve on."""

    def __post_init__(self) -> None:
        for name in (
            "tokens",
            "relu_tokens",
            "topk_tokens",
            "d_sae",
            "k",
            "batch_size",
            "analysis_tokens",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo",
        help="the whole pipeline on the bundled model: cache, train, analyze, compare, serve",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="YAML or JSON file of options; flags override it")
    add_dataclass_args(p, DemoConfig)
    p.set_defaults(func=run)
    return p


def _sae(*argv: str) -> None:
    """Run one `sae` subcommand in this process; a failure stops the demo with its message."""
    from sae.cli import main

    logger.info("$ sae %s", shlex.join(argv))
    code = main(list(argv))
    if code != 0:
        raise UserError(f"step `sae {argv[0]}` failed (exit {code}); fix it and run demo again")


def _step(name: str, done: bool) -> bool:
    """True if the step must run; logs skips of finished steps."""
    if done:
        logger.info("%s: already done, skipping", name)
    return not done


def run_pipeline(cfg: DemoConfig) -> dict[str, Any]:
    """Cache, train, analyze and compare; returns the report as data (also saved as JSON)."""
    out = cfg.out
    cache, run_dir, held_out = out / "cache", out / "train", out / "validation"
    dicts = {m: run_dir / m / "dictionary" for m in MEMBERS}  # one run folder each
    timings: dict[str, float] = {}

    t = time.perf_counter()
    if _step("cache", _cache_complete(cache)):
        _sae("cache", "--out", str(cache), "--model", cfg.model, "--hooks", cfg.hook,
             "--max-tokens", str(cfg.tokens), "--text.context-size", str(cfg.context_size))  # fmt: skip
    if _step("cache validation", _cache_complete(held_out)):
        # One context more than evaluated on: the cache's last context may be cut short.
        _sae("cache", "--out", str(held_out), "--model", cfg.model, "--hooks", cfg.hook,
             "--text.split", "validation", "--max-tokens", str(cfg.eval_tokens + cfg.context_size),
             "--text.context-size", str(cfg.context_size))  # fmt: skip
    timings["cache"] = time.perf_counter() - t

    t = time.perf_counter()
    if _step("train", all((d / "cfg.json").is_file() for d in dicts.values())):
        run_parallel([_train_job(cfg, m, dicts[m].parent) for m in MEMBERS
                      if not (dicts[m] / "cfg.json").is_file()])  # fmt: skip
    timings["train"] = time.perf_counter() - t

    t = time.perf_counter()
    for d in dicts.values():
        if _step(f"analyze {d.name}", (d / "analysis" / "features.sqlite").is_file()):
            _sae(
                "analyze",
                str(d),
                "--model",
                cfg.model,
                "--tokens",
                str(cfg.analysis_tokens),
                "--context-size",
                str(cfg.context_size),
            )
    timings["analyze"] = time.perf_counter() - t

    t = time.perf_counter()
    a, b = dicts["relu_l1"], dicts["topk_auxk"]
    compare_json = a / "analysis" / f"compare-{b.name}.json"
    if _step("compare", compare_json.is_file()):
        _sae("compare", str(a), str(b), "--model", cfg.model, "--out", str(compare_json),
             "--tokens", str(cfg.compare_tokens), "--show", "0",
             "--context-size", str(cfg.context_size))  # fmt: skip
    timings["compare"] = time.perf_counter() - t

    report = build_report(cfg, run_dir, dicts, compare_json, timings)
    from sae.atomic import atomic_write_json

    atomic_write_json(out / "report.json", report)
    return report


def _train_job(cfg: DemoConfig, member: str, run: Path) -> TrainJob:
    """`sae train` of one dictionary (resumed if it has a checkpoint)."""
    tokens = cfg.relu_tokens if member == "relu_l1" else cfg.topk_tokens
    argv = ["train", "--cache", str(cfg.out / "cache"), "--out-dir", str(run),
            "--objective.name", member, "--dictionary.d-sae", str(cfg.d_sae),
            "--total-tokens", str(tokens), "--batch-size", str(cfg.batch_size),
            "--optim.lr", str(cfg.lr), "--autocast", cfg.autocast,
            "--optim.lazy", str(cfg.lazy_adam).lower(), "--eval.tokens", str(cfg.eval_tokens),
            "--eval.cache", str(cfg.out / "validation"),
            "--kl-finetune.tokens", str(cfg.kl_finetune_tokens)]  # fmt: skip
    if member == "relu_l1":
        argv += ["--objective.l1-coefficient", str(cfg.l1_coefficient),
                 "--objective.target-l0", str(cfg.target_l0),
                 "--objective.target-l0-rate", str(cfg.target_l0_rate),
                 "--resample.count", str(cfg.resample_count),
                 "--resample.stop-fraction", str(cfg.resample_stop),
                 "--resample.encoder-scale", str(cfg.resample_encoder_scale),
                 "--resample.fire-fraction", str(cfg.resample_fire_fraction)]  # fmt: skip
    else:
        argv += ["--objective.k", str(cfg.k), "--objective.dead-tokens", str(cfg.dead_tokens)]
    from training.checkpoint import CHECKPOINT_FILE

    if (run / CHECKPOINT_FILE).is_file():
        argv.append("--resume")  # with no checkpoint yet, `sae train` starts over by itself
    return TrainJob(member, argv, run, tokens + cfg.kl_finetune_tokens)


def _cache_complete(cache: Path) -> bool:
    # `sae cache` resumes by itself; a finished cache answers "0 new tokens" quickly, but
    # loading the model for that costs seconds, so trust the manifest when it is there.
    return any(cache.glob("*/manifest.json"))


def build_report(
    cfg: DemoConfig,
    run_dir: Path,
    dicts: dict[str, Path],
    compare_json: Path,
    timings: dict[str, float],
) -> dict[str, Any]:
    from analysis.cli import format_feature, pick_features
    from analysis.store import FeatureStore
    from sae.evaluation import heldout_figures
    from sae.io import read_json

    report: dict[str, Any] = {"timings_s": timings, "dictionaries": {}}
    for member, path in dicts.items():
        # The held-out figures saved with the dictionary: the same ones `sae info` prints.
        provenance = read_json(path / "cfg.json").get("provenance", {})
        figures = heldout_figures(provenance)
        with FeatureStore.open(path / "analysis", readonly=True) as store:
            cards = [format_feature(store, fid) for fid in pick_features(store, cfg.show)]
        report["dictionaries"][member] = {"path": str(path), "eval": figures, "features": cards,
                                          "eval_source": provenance.get("eval_source")}  # fmt: skip
    if compare_json.is_file():
        report["comparison"] = json.loads(compare_json.read_text()).get("summary", {})
    return report


def _width(figure: Any) -> int:
    return max(len(figure.label), 7) + 2


def format_report(report: dict[str, Any]) -> str:
    from sae.evaluation import FIGURES, format_figure

    lines = ["", "=" * 72, "demo report", "=" * 72]
    dictionaries = list(report["dictionaries"].values())
    first = dictionaries[0] if dictionaries else {"eval": {}}
    on = f" ({first['eval_source']})" if first.get("eval_source") else ""
    lines.append(f"held-out evaluation on {int(first['eval'].get('eval_tokens', 0)):,} tokens{on}")
    lines.append(f"{'dictionary':<12}" + "".join(f"{f.label:>{_width(f)}}" for f in FIGURES))
    for name, d in report["dictionaries"].items():
        values = [format_figure(f, d["eval"].get(f.key)) for f in FIGURES]
        lines.append(
            f"{name:<12}"
            + "".join(f"{v:>{_width(f)}}" for f, v in zip(FIGURES, values, strict=True))
        )
    if report.get("comparison"):
        summary = ", ".join(f"{k} {v:.3g}" for k, v in report["comparison"].items())
        lines.append(f"relu vs topk (feature splitting / universality): {summary}")
    for name, d in report["dictionaries"].items():
        lines += ["", f"--- a few {name} features ---", *d["features"]]
    t = report["timings_s"]
    lines.append("")
    lines.append("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in t.items() if v > 0))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = dataclass_from_args(DemoConfig, args, args.config)
    start = time.perf_counter()
    report = run_pipeline(cfg)
    print(format_report(report))
    print(
        f"pipeline finished in {time.perf_counter() - start:.0f} s; report: {cfg.out}/report.json"
    )
    sys.stdout.flush()
    if cfg.serve:
        # `sae serve` prints the browser URL, with the API key it made for this run.
        print("starting the web feature browser (Ctrl-C to stop)...", flush=True)
        _sae("serve", *(str(p) for p in report_paths(report)), "--host", cfg.host,
             "--port", str(cfg.port))  # fmt: skip
    return 0


def report_paths(report: dict[str, Any]) -> list[str]:
    """NAME=PATH arguments for `sae serve` (each dictionary's folder is named `dictionary`)."""
    return [f"{name}={d['path']}" for name, d in report["dictionaries"].items()]
