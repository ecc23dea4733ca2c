"""`sae train --model M --hooks H1 [H2 ...]`: dictionaries straight from a model, no cache.

    sae train --model stdlib-1l-512 --hooks blocks.0.mlp.hook_post blocks.0.hook_resid_post \\
        --total-tokens 40000 --dictionary.d-sae 256 --out-dir OUT

One forward pass per batch of contexts serves every hook; each hook trains its own dictionary
(or every member of --sweep) in its own run folder, OUT/<hook>/, laid out as a cached run's
(OUT itself when there is one hook). The trainers advance in lockstep (training/lockstep.py);
checkpoints hold each hook's stream position, and --resume continues exactly (the shuffling
buffer's permutation is a function of the seed and position, activations/stream.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from sae.errors import UserError
from training.config import TrainConfig
from training.stream_source import StreamConfig

logger = logging.getLogger(__name__)

STREAM_FILE = "stream.json"
"""The stream options of a run (model, hooks, text), beside the per-hook run folders."""


def hook_dirs(cfg: TrainConfig, hooks: tuple[str, ...]) -> dict[str, Path]:
    """Run folder of each hook: the run folder itself for one hook, else OUT/<hook>."""
    out = Path(cfg.out_dir)
    return {hooks[0]: out} if len(hooks) == 1 else {h: out / h for h in hooks}


def check_text_budget(scfg: StreamConfig, tokens: int) -> None:
    """A local text shorter than the budget, one line before any work: a byte-level tokenizer
    makes at most one token per byte, so a text of N bytes holds at most N tokens."""
    from activations.text import BUNDLED

    if scfg.text.dataset == BUNDLED:
        from activations.corpus import iter_files

        split: Any = scfg.text.split
        size = sum(len(d.text.encode()) for d in iter_files(split))
    else:
        path = Path(scfg.text.dataset).expanduser()
        if not path.exists() or scfg.text.token_column:
            return  # a hub dataset (or token ids): its length is known only by reading it
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        size = sum(f.stat().st_size for f in files)
    if tokens > size:
        raise UserError(
            f"--total-tokens {tokens:,} is more than the text holds: {scfg.text.dataset} "
            f"(split {scfg.text.split}) is {size:,} bytes, at most that many tokens; "
            "lower --total-tokens or give more text"
        )


def train_from_model(
    args: argparse.Namespace, cfg: TrainConfig, scfg: StreamConfig, members: list[Any]
) -> int:
    from activations.text import check_source
    from training.run_folder import own_run_folder, prepare_run_folder

    if not scfg.model or not scfg.hooks:
        raise UserError("training from a model needs --model NAME and --hooks H1 [H2 ...]")
    if args.cache:
        raise UserError("give --cache (train on a cache) or --model/--hooks (stream), not both")
    if cfg.eval.cache is not None:
        raise UserError("--eval.cache is for training on a cache; from a model, evaluate on "
                        "another split with --heldout-split")  # fmt: skip
    check_source(scfg.text)  # an unreachable dataset: one line before the model loads
    if scfg.heldout_split is not None:
        check_source(dataclasses.replace(scfg.text, split=scfg.heldout_split))
    check_text_budget(scfg, cfg.total_tokens)
    dirs = hook_dirs(cfg, tuple(dict.fromkeys(scfg.hooks)))
    main = int(os.environ.get("RANK", "0")) == 0
    with own_run_folder(cfg.out_dir):
        for out in dirs.values():
            prepare_run_folder(out, resume=args.resume, overwrite=args.overwrite)
        options = _stream_options(cfg, scfg, resume=args.resume)
        return _train(args, cfg, scfg, members, dirs, options if main else None)


def _stream_options(cfg: TrainConfig, scfg: StreamConfig, *, resume: bool) -> dict[str, Any]:
    """The options stream.json records; on resume, a UserError naming the first that differs."""
    from sae.dataclass_cli import to_dict
    from training.run_folder import first_difference

    path = Path(cfg.out_dir) / STREAM_FILE
    options = to_dict(scfg)
    options.pop("prefetch_batches")  # how fast, not what: may change on resume
    if resume and path.is_file():
        found = first_difference(json.loads(path.read_text()), options)
        if found is not None:
            raise UserError(
                f"cannot resume {cfg.out_dir}: {found[0]} differs (saved {found[1]}, now "
                f"{found[2]}); resume with the saved value, or start over with --overwrite"
            )
    return options


def _train(
    args: argparse.Namespace,
    cfg: TrainConfig,
    scfg: StreamConfig,
    members: list[Any],
    dirs: dict[str, Path],
    options: dict[str, Any] | None,
) -> int:
    import torch

    from activations.model import load_model
    from activations.stream import StreamedActivations
    from sae.atomic import atomic_write_json
    from sae.devices import DTYPES
    from sae.evaluation import summary_line
    from training.distributed import init_from_env, resolve_device
    from training.lockstep import LatchedStop, fit_together
    from training.run_folder import check_resume_config, run_config
    from training.stream_source import SharedStream, heldout_contexts, heldout_evaluators
    from training.trainer import Trainer

    want_cuda = cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available()
    )
    dist = init_from_env("cuda" if want_cuda else "cpu")
    if cfg.batch_size % dist.world_size:
        raise UserError(
            f"--batch-size {cfg.batch_size} does not split over {dist.world_size} processes"
        )
    device = resolve_device(cfg.device, dist)
    model = load_model(str(scfg.model), device=device, dtype=DTYPES[scfg.model_dtype])
    n_eval = cfg.eval.resolved_tokens(cfg.total_tokens)
    _, eval_contexts = heldout_contexts(scfg, n_eval)
    stream = StreamedActivations(
        model,
        list(dirs),
        scfg.text,
        cfg.batch_size // dist.world_size,
        device,
        seed=cfg.seed,
        drop_bos=scfg.drop_bos,
        mix_passes=scfg.mix_passes(),
        rank=dist.rank,
        world_size=dist.world_size,
        skip_contexts=eval_contexts if scfg.heldout_split is None else 0,
        prefetch=scfg.prefetch_batches,
    )
    if options is not None:  # the model, hooks and text are good: the run starts here
        atomic_write_json(Path(cfg.out_dir) / STREAM_FILE, options)
    evaluators: dict[str, Any] = {}
    if dist.is_main:
        evaluators = heldout_evaluators(
            stream,
            scfg,
            n_eval,
            loss_recovered=cfg.eval.loss_recovered,
            dense_threshold=cfg.logging.dense_threshold,
        )
    shared = SharedStream(stream, dist)
    stop = LatchedStop()
    trainers = []
    for i, (hook, out) in enumerate(dirs.items()):
        cfgs = [_for_hook(c, hook, str(scfg.model), out) for _, c in members]
        names = [n for n, _ in members]
        if args.resume:
            check_resume_config(out, run_config(names, cfgs))
        trainers.append(
            Trainer(
                cfgs,
                stream.d_ins[hook],
                names=names,
                evaluator=evaluators.get(hook),
                resume=args.resume,
                stop=stop,
                progress=i == 0,
            )
        )
    views = [shared.views[h] for h in dirs]
    try:
        results = fit_together(trainers, views, stop, position=lambda v: v.position)
    finally:
        shared.close()
    if not dist.is_main:
        return 130 if any(r.interrupted for r in results) else 0
    if any(r.interrupted for r in results):
        print(
            f"interrupted at step {results[0].steps}; continue with the same command plus --resume"
        )
        return 130
    for hook, result in zip(dirs, results, strict=True):
        for name, path in result.paths.items():
            d = result.dictionaries[name]
            print(f"{hook} {name}: {path} (d_in {d.d_in}, d_sae {d.d_sae})")
            print(f"  {summary_line(d.cfg.provenance.get('eval', {}))}")
    tokens = results[0].tokens
    print(f"trained {len(dirs)} hook(s) on {tokens} tokens in {results[0].steps} steps "
          f"from {scfg.model}; run folder {cfg.out_dir}")  # fmt: skip
    if tokens < cfg.total_tokens:
        print(f"the text ran out after {tokens} of --total-tokens {cfg.total_tokens}: the "
              "schedules were planned for more; lower --total-tokens or give more text")  # fmt: skip
    return 0


def _for_hook(c: TrainConfig, hook: str, model: str, out: Path) -> TrainConfig:
    shape = dataclasses.replace(c.dictionary, hook_name=hook, model_name=model)
    return dataclasses.replace(c, dictionary=shape, out_dir=out)
