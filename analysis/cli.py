"""`sae analyze DICT` and `sae compare DICT_A DICT_B`.

    sae analyze runs/my_dict --tokens 200000 --show 3
    sae analyze runs/my_dict --skip-analysis --features 5 17 --export-neuronpedia np/
    sae compare runs/dict_4k runs/dict_8k --tokens 100000

`analyze` runs text through the model and the dictionary once, writes the feature store
(`<dict>/analysis/` unless --out), and can print a plain-text summary of some features.
One `sae analyze` at a time writes a store; re-analysing the same dictionary keeps its
labels, a store of another dictionary (other features) is refused unless --overwrite.
`compare` prints, for features of A, the nearest features of B by decoder cosine and by
activation correlation, and writes the full result as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

from analysis.cards import format_feature, pick_features
from sae.dataclass_cli import add_dataclass_args, dataclass_from_args, parse_bool
from sae.errors import DiskFullError, UserError

logger = logging.getLogger(__name__)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="language model (default: the dictionary's model_name, "
                   "else the bundled model)")  # fmt: skip
    p.add_argument("--text", default="bundled", help="text source: 'bundled', a local file "
                   "or folder, or a Hugging Face dataset name (default: bundled)")  # fmt: skip
    p.add_argument("--split", help="dataset split (default: validation for the bundled "
                   "corpus, held out from training; train otherwise)")  # fmt: skip
    p.add_argument("--context-size", type=int,
                   help="tokens per context (default: 128, or the model's context if shorter)")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=32, help="contexts per forward pass")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, or auto")


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from analysis.accumulator import AnalysisConfig

    p = subparsers.add_parser(
        "analyze",
        help="per-feature statistics, top activations and logit effects -> feature store",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("dictionary", help="dictionary directory or hub repo id")
    _add_common(p)
    p.add_argument("--hook", help="hook name, if the dictionary's cfg.json has none")
    p.add_argument("--cache", metavar="DIR", help="read activations (with their token ids) "
                   "from this `sae cache` folder instead of running the model")  # fmt: skip
    p.add_argument("--tokens", type=int, dest="n_tokens", default=argparse.SUPPRESS,
                   help="tokens to analyse (same as --n-tokens)")  # fmt: skip
    add_dataclass_args(p, AnalysisConfig)
    p.add_argument("--out", help="feature store directory (default: <dictionary>/analysis)")
    p.add_argument("--overwrite", nargs="?", const=True, default=False, type=parse_bool,
                   metavar="BOOL", help="replace a store holding another dictionary's "
                   "analysis (and its labels)")  # fmt: skip
    p.add_argument("--skip-analysis", action="store_true",
                   help="use the existing feature store: only show / export")  # fmt: skip
    p.add_argument("--show", type=int, default=0, metavar="N",
                   help="print a plain-text summary of N features (evenly spread over the "
                   "features that fired)")  # fmt: skip
    p.add_argument("--features", type=int, nargs="+", metavar="ID", help="features to print")
    p.add_argument("--export-neuronpedia", metavar="DIR", help="write Neuronpedia-style JSON")
    p.add_argument("--export-delphi", metavar="DIR", help="write a Delphi latent cache")
    p.set_defaults(func=run)

    c = subparsers.add_parser(
        "compare",
        help="nearest features between two dictionaries (decoder cosine, activation correlation)",
    )
    c.add_argument("dictionary_a")
    c.add_argument("dictionary_b")
    _add_common(c)
    c.add_argument("--tokens", type=int, default=100_000, help="tokens for the correlations")
    c.add_argument("-k", type=int, default=5, help="nearest features kept per feature")
    c.add_argument("--show", type=int, default=10, metavar="N", help="features of A to print")
    c.add_argument("--out", help="JSON result (default: <dictionary_a>/analysis/compare-<b>.json)")
    c.set_defaults(func=run_compare)
    return p


# -- shared set-up ------------------------------------------------------------------------------


def _text_config(args: argparse.Namespace, model: Any) -> Any:
    from activations.text import TextConfig

    n_ctx = int(model.cfg.n_ctx)
    context_size = args.context_size or min(128, n_ctx)
    if context_size > n_ctx:
        raise UserError(f"--context-size {context_size} exceeds the model's context {n_ctx}")
    split = args.split or ("validation" if args.text == "bundled" else "train")
    try:
        return TextConfig(dataset=args.text, split=split, context_size=context_size,
                          batch_size=args.batch_size)  # fmt: skip
    except ValueError as e:
        raise UserError(str(e)) from e


def _load(dictionary: str, model_name: str | None, device: str) -> tuple[Any, Any, str]:
    from activations.model import BUNDLED_MODEL, load_model
    from sae.io import load_dictionary

    d = load_dictionary(dictionary, device=device)
    name = model_name or d.cfg.model_name or BUNDLED_MODEL
    model = load_model(name, device=device)
    return d, model, name


def _store_dir(args: argparse.Namespace) -> Path:
    if args.out:
        return Path(args.out)
    path = Path(args.dictionary).expanduser()
    if not path.is_dir():
        raise UserError(f"{args.dictionary} is not a local directory: pass --out for the store")
    return path / "analysis"


# -- analyze ------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    from analysis.accumulator import AnalysisConfig
    from analysis.analyze import analyze
    from analysis.store import FeatureStore
    from sae.devices import resolve_device
    from sae.locks import hold_folder

    store_dir = _store_dir(args)
    if not args.skip_analysis:
        cfg = dataclass_from_args(AnalysisConfig, args, None)
        device = str(resolve_device(args.device))
        with hold_folder(store_dir, "sae analyze"):
            dictionary, model, model_name = _load(args.dictionary, args.model, device)
            _check_store(store_dir, args, dictionary)
            text = _text_config(args, model)
            arrays = analyze(model, dictionary, text, cfg, hook_name=args.hook,
                             dictionary_name=str(args.dictionary), model_name=model_name,
                             cache=args.cache)  # fmt: skip
            meta = _store(store_dir, arrays)
        print(f"analysed {meta.n_tokens:,} tokens: {meta.d_sae} features -> {store_dir} "
              f"(generation {meta.generation})")  # fmt: skip
    with FeatureStore.open(store_dir, readonly=True) as store:
        ids = list(args.features or []) or pick_features(store, args.show)
        for fid in ids:
            print(format_feature(store, fid))
        if args.export_neuronpedia:
            from analysis.export import export_neuronpedia

            print(f"Neuronpedia JSON -> {export_neuronpedia(store, args.export_neuronpedia)}")
        if args.export_delphi:
            from analysis.export import export_delphi

            print(f"Delphi latent cache -> {export_delphi(store, args.export_delphi)}")
    return 0


def _check_store(store_dir: Path, args: argparse.Namespace, dictionary: Any) -> None:
    """Refuse (or with --overwrite, clear) a store holding another dictionary's analysis: its
    feature ids, and the labels attached to them, mean other features."""
    from analysis.store import DB_NAME, FeatureStore

    if not (store_dir / DB_NAME).is_file():
        return
    with FeatureStore.open(store_dir, readonly=True) as store:
        meta = store.meta() if store.has_statistics() else None
    if meta is None:
        return
    hook = args.hook or dictionary.cfg.hook_name
    before, now = Path(meta.dictionary).expanduser(), Path(args.dictionary).expanduser()
    moved = before.is_dir() and now.is_dir() and before.resolve() != now.resolve()
    if meta.d_sae == dictionary.d_sae and meta.hook_name == hook and not moved:
        return  # the same dictionary again: statistics are replaced, labels kept
    if not args.overwrite:
        raise UserError(
            f"{store_dir} holds the analysis of another dictionary ({meta.dictionary}: "
            f"{meta.d_sae} features at {meta.hook_name}); pass --overwrite to replace it and "
            "its labels, or pick another --out"
        )
    for path in [*store_dir.glob(f"{DB_NAME}*"), *store_dir.glob("arrays-*")]:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    logger.info("cleared the feature store in %s (--overwrite)", store_dir)


def _store(store_dir: Path, arrays: Any) -> Any:
    """Write the analysis into the store; a full disk is one line (the store keeps its
    previous analysis: the arrays are written atomically, the table swap is a transaction)."""
    from analysis.store import DB_NAME, FeatureStore
    from sae.atomic import free_bytes

    db = store_dir / DB_NAME
    try:
        with FeatureStore.open(store_dir) as store:
            return store.replace_statistics(arrays)
    except DiskFullError as e:
        if e.needed is not None:
            raise
        # The arrays directory filled the disk; say how much it needs in all.
        needed = sum(getattr(arrays, name).nbytes for name in arrays.ARRAY_FIELDS)
        raise DiskFullError(e.path, needed, e.free, during_write=True) from e
    except sqlite3.OperationalError as e:
        if "full" not in str(e):
            raise
        # The swap rewrites the features table and its search index through the WAL: about
        # the database's size again (or a few hundred bytes a feature for a new store).
        needed = max(db.stat().st_size if db.is_file() else 0, arrays.meta.d_sae * 512)
        raise DiskFullError(
            db, needed, free_bytes(store_dir), during_write=True, kept=db.is_file()
        ) from e


# -- compare ------------------------------------------------------------------------------------


def run_compare(args: argparse.Namespace) -> int:
    from analysis.compare import compare_dictionaries, comparison_json
    from sae.atomic import atomic_write_json
    from sae.devices import resolve_device
    from sae.io import load_dictionary

    device = str(resolve_device(args.device))
    a, model, _ = _load(args.dictionary_a, args.model, device)
    b = load_dictionary(args.dictionary_b, device=device)
    text = _text_config(args, model)
    if args.tokens < 1 or args.k < 1:
        raise UserError("--tokens and -k must be positive")
    cmp = compare_dictionaries(model, a, b, text, args.tokens, k=args.k)
    doc = comparison_json(cmp, str(args.dictionary_a), str(args.dictionary_b))
    if args.out:
        out = Path(args.out)
    elif Path(args.dictionary_a).is_dir():
        out = Path(args.dictionary_a) / "analysis" / f"compare-{Path(args.dictionary_b).name}.json"
    else:
        out = Path(f"compare-{Path(args.dictionary_b).name}.json")
    atomic_write_json(out, doc)
    print(f"compared over {cmp.n_tokens:,} tokens ({a.d_sae} vs {b.d_sae} features) -> {out}")
    for key, value in doc["summary"].items():
        print(f"  {key}: {value:.3f}")
    for row in doc["a_to_b"][: args.show]:
        cos = ", ".join(f"{i}:{v:.2f}" for i, v in row["cosine"][:3])
        corr = ", ".join(f"{i}:{v:.2f}" for i, v in row["correlation"][:3])
        print(f"  A{row['feature_id']:>5}  cosine -> {cos}   correlation -> {corr}")
    logger.debug("%s", json.dumps(doc["summary"]))
    return 0
