"""`sae info PATH`: what a dictionary is; `sae export PATH OUT`: rewrite it in another layout.

Both read any layout `load_dictionary` reads (ours, SAELens, sparsify, Gemma Scope, a hub
repo id). A broken directory prints one line naming the file and field, and exits 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

EXPORT_FORMATS = ("saelens", "native")


def add_parser(subparsers: Any) -> None:
    info = subparsers.add_parser(
        "info",
        help="describe a dictionary (architecture, sizes, hook, model, parameter count)",
        description="Describe a dictionary directory, foreign layout or hub repo id.",
    )
    _add_source_args(info)
    info.add_argument("--json", action="store_true", help="print one JSON object instead")
    info.set_defaults(func=run_info)

    export = subparsers.add_parser(
        "export",
        help="write a dictionary in another layout (SAELens, or ours)",
        description="Convert a dictionary to another layout. Writes are atomic.",
    )
    _add_source_args(export)
    export.add_argument("out", help="output directory (replaced whole if it exists)")
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default="saelens",
        help="saelens: cfg.json + sae_weights.safetensors; native: our cfg.json + sae.safetensors",
    )
    export.set_defaults(func=run_export)


def _add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="dictionary directory, file inside one, or hub repo id org/name")
    p.add_argument("--subfolder", default=None, help="subfolder inside a hub repo")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")


def describe(d: Any) -> dict[str, Any]:
    """The facts `sae info` prints, as a plain dict (also what --json prints)."""
    cfg = d.cfg
    return {
        "architecture": cfg.architecture,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "k": cfg.k,
        "hook": cfg.hook_name,
        "model": cfg.model_name,
        "dtype": cfg.dtype,
        "parameters": sum(p.numel() for p in d.parameters()),
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "format": cfg.provenance.get("source_format", "native"),
        "normalization": cfg.normalization,
        "provenance": cfg.provenance,
    }


def run_info(args: argparse.Namespace) -> int:
    from sae.evaluation import heldout_figures, summary_line
    from sae.io import load_dictionary

    d = load_dictionary(args.path, subfolder=args.subfolder, revision=args.revision)
    facts = describe(d)
    if args.json:
        print(json.dumps(facts, indent=2, default=str))
        return 0
    print(f"{args.path}")
    for key, value in facts.items():
        if key == "provenance":
            value = {k: v for k, v in value.items() if k != "eval"}
        if key in ("normalization", "provenance"):
            if not value:
                continue
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        elif key == "parameters":
            value = f"{value:,}"
        elif value is None:
            value = "-"
        print(f"  {key:<22} {value}")
    print(f"  {'evaluation':<22} {summary_line(heldout_figures(d.cfg.provenance))}")
    if d.cfg.provenance.get("eval_source"):
        print(f"  {'evaluated on':<22} {d.cfg.provenance['eval_source']}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from sae.formats import saelens
    from sae.io import load_dictionary, save_dictionary

    d = load_dictionary(args.path, subfolder=args.subfolder, revision=args.revision)
    if args.format == "saelens":
        out = saelens.export(d, args.out)
    else:
        out = save_dictionary(d, args.out)
    print(f"wrote {d.cfg.architecture} dictionary ({args.format} layout) to {out}")
    return 0
