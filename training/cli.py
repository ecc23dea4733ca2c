"""`sae train`: train a dictionary (or a sweep of them) on an activation cache, or straight
from a model on several hooks at once (training/stream_cli.py).

    sae train --cache activation_cache --objective.name topk_auxk --objective.k 32
    sae train --model stdlib-1l-512 --hooks blocks.0.mlp.hook_post blocks.0.hook_resid_post
    sae train --config train.yaml --optim.lr 1e-4            # flags override the file
    sae train --cache c --sweep objective.l1_coefficient=1,3,10 --sweep dictionary.d_sae=512,1024
    sae train --config train.yaml --resume                   # continue from the last checkpoint
    torchrun --nproc_per_node 2 -m sae.cli train ...         # data parallel

Every option comes from `TrainConfig` (training/config.py). The run folder gets the resolved
config.json, metrics.jsonl, checkpoint/, plots/ and the dictionary (one folder per member).
A folder holding a run is refused unless --resume or --overwrite (training/run_folder.py), and
one process at a time writes it.
"""

from __future__ import annotations

import argparse
from typing import Any

from sae.errors import UserError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from sae.dataclass_cli import add_dataclass_args, parse_bool
    from training.config import TrainConfig
    from training.stream_source import StreamConfig

    parser = subparsers.add_parser(
        "train",
        help="train sparse dictionaries on cached activations or straight from a model",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML or JSON file of options; flags override it")
    parser.add_argument("--cache", help="activation cache folder (from `sae cache`)")
    parser.add_argument("--hook", help="hook to train on, if the cache holds several")
    parser.add_argument(
        "--resume", action="store_true", help="continue the run in --out-dir from its checkpoint"
    )
    parser.add_argument(
        "--overwrite",
        nargs="?",
        const=True,
        default=False,
        type=parse_bool,
        metavar="BOOL",
        help="replace the run already in --out-dir (its checkpoint, metrics and dictionaries)",
    )
    parser.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="FIELD=V1,V2",
        help="train one dictionary per value (repeat for a grid), e.g. objective.k=16,32",
    )
    add_dataclass_args(parser, TrainConfig)
    add_dataclass_args(parser, StreamConfig)
    parser.set_defaults(func=run)
    return parser


def _load_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """TrainConfig and StreamConfig from one --config file (each takes its own keys) and flags."""
    import dataclasses

    from sae.dataclass_cli import dataclass_from_args, load_config_file
    from training.config import TrainConfig
    from training.stream_source import StreamConfig

    data: dict[str, Any] = {}
    if args.config:
        try:
            data = load_config_file(args.config)
        except ValueError as e:
            raise UserError(str(e)) from None
    stream_keys = {f.name for f in dataclasses.fields(StreamConfig)}
    train_part = {k: v for k, v in data.items() if k not in stream_keys}
    stream_part = {k: v for k, v in data.items() if k in stream_keys}
    return (
        dataclass_from_args(TrainConfig, args, base=train_part),
        dataclass_from_args(StreamConfig, args, base=stream_part),
    )


def run(args: argparse.Namespace) -> int:
    from activations.cache_format import open_manifest
    from training.run_folder import own_run_folder, prepare_run_folder
    from training.sweep import expand_grid, parse_sweep

    cfg, stream_cfg = _load_configs(args)
    try:
        grid = parse_sweep(args.sweep)
        members = expand_grid(cfg, grid)
    except ValueError as e:
        raise UserError(str(e)) from None
    if stream_cfg.model or stream_cfg.hooks:
        from training.stream_cli import train_from_model

        if cfg.kl_finetune.tokens:
            raise UserError("--kl-finetune.tokens needs --cache: the phase reads the cache's "
                            "training contexts (train on a cache to fine-tune)")  # fmt: skip
        return train_from_model(args, cfg, stream_cfg, members)
    if not args.cache:
        raise UserError(
            "--cache is required (the activation cache folder to train on), "
            "or --model NAME --hooks H1 [H2 ...] to train straight from a model"
        )

    open_manifest(args.cache, args.hook)  # a missing cache or hook: one line, before the lock
    if cfg.transcoder.target:
        from activations.reader import paired_shards

        paired_shards(args.cache, args.hook, cfg.transcoder.target)  # likewise the target
        if cfg.kl_finetune.tokens:
            raise UserError("--kl-finetune.tokens splices a sparse autoencoder at its own hook; "
                            "train a transcoder (--transcoder.target) without it")  # fmt: skip
    elif cfg.transcoder.skip:
        raise UserError("--transcoder.skip needs --transcoder.target HOOK (a transcoder)")
    with own_run_folder(cfg.out_dir):
        prepare_run_folder(cfg.out_dir, resume=args.resume, overwrite=args.overwrite)
        return _train(args, cfg, members)


def _train(args: argparse.Namespace, cfg: Any, members: list[Any]) -> int:
    import os

    from sae.evaluation import summary_line
    from training.cache_source import cache_source
    from training.run_folder import check_resume_config, run_config
    from training.trainer import Trainer

    main = int(os.environ.get("RANK", "0")) == 0
    if cfg.kl_finetune.tokens:
        from training.kl_finetune import cache_phase, check_cache

        check_cache(cfg.kl_finetune, args.cache, args.hook, cfg.eval.loss_recovered)
    source = cache_source(cfg, args.cache, args.hook, main=main)
    reader = source.reader
    for _, c in members:
        c.dictionary.hook_name = c.dictionary.hook_name or reader.hook_name
        c.dictionary.model_name = c.dictionary.model_name or source.model_name
    if args.resume:
        configs = [c for _, c in members]
        check_resume_config(cfg.out_dir, run_config([n for n, _ in members], configs))

    kl_phase = None
    if cfg.kl_finetune.tokens and main:
        kl_phase = cache_phase(cfg.kl_finetune, args.cache, source.evaluator)
    trainer = Trainer(
        [c for _, c in members],
        reader.d_in,
        names=[n for n, _ in members],
        evaluator=source.evaluator,
        resume=args.resume,
        kl_phase=kl_phase,
        d_out=reader.d_out,
    )
    result = trainer.fit(reader)
    if not trainer.dist.is_main:
        return 130 if result.interrupted else 0  # rank 0 reports for the run
    if result.interrupted:
        print(f"interrupted at step {result.steps}; continue with the same command plus --resume")
        return 130
    for name, path in result.paths.items():
        figures = result.dictionaries[name].cfg.provenance.get("eval", {})
        print(f"{name}: {path}\n  {summary_line(figures)}")
    first = next(iter(result.dictionaries.values())).cfg.provenance
    kl = f" (the last {first['kl_finetune_tokens']} with the KL term)" if kl_phase else ""
    print(f"trained {result.tokens} tokens{kl} in {result.steps} steps; "
          f"run folder {result.out_dir}")  # fmt: skip
    return 0
