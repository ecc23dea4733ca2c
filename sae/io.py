"""The dictionary file format: a directory `cfg.json` + `sae.safetensors`, and where to find one.

    my_dictionary/
      cfg.json          {"format_version": 1, "architecture": "topk", "d_in": 768, ...}
      sae.safetensors   W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in],
                        plus the architecture's extras (jumprelu: threshold [d_sae])

A transcoder's cfg.json also names its output (`d_out`, `hook_name_out`, `skip`): then W_dec
is [d_sae, d_out], b_dec [d_out], and a skip transcoder holds W_skip [d_in, d_out]. A file
without those fields is a sparse autoencoder, read as before.

Every field of `DictionaryConfig` is in cfg.json, plus `format_version`. Weights are stored
in `cfg.dtype`, with any input scaling already folded in (`Dictionary.fold_input_scale`), so a
loaded dictionary acts on raw activations. Nothing is unpickled, ever.

`load_dictionary` also reads SAELens, EleutherAI sparsify and Gemma Scope layouts (see
sae/formats/) and hub repo ids. Anything wrong with a file raises `DictionaryFormatError`
naming the file and the field, never a KeyError from deep inside torch.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sae.atomic import atomic_dir
from sae.base import Dictionary, DictionaryConfig, architecture_class, build
from sae.devices import DTYPES
from sae.errors import DictionaryFormatError, UserError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae.safetensors"

# A hub repo id, optionally followed by a subfolder: org/name[/sub/folder].
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+)?")


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPES.items():
        if dt == dtype:
            return name
    raise ValueError(f"unsupported dictionary dtype {dtype}; use one of {', '.join(DTYPES)}")


# -- saving ------------------------------------------------------------------------------------
def save_dictionary(d: Dictionary, path: str | Path, *, for_inference: bool = True) -> Path:
    """Write `d` to the directory `path` atomically (an existing directory is replaced whole).

    With `for_inference` (the default), architectures that have a batch-independent inference
    form (batchtopk -> jumprelu) are converted first; pass False to keep the training form.
    """
    from safetensors.torch import save_file

    to_inference = getattr(d, "to_inference", None)
    if for_inference and callable(to_inference):
        d = to_inference()
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in d.state_dict().items()}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise ValueError(f"mixed dtypes in dictionary weights: {sorted(map(str, dtypes))}")
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"refusing to save {path}: {name} contains NaN or inf")
    cfg = dataclasses.replace(d.cfg, dtype=dtype_name(dtypes.pop()))
    path = Path(path)
    size = sum(t.numel() * t.element_size() for t in tensors.values()) + 65536
    with atomic_dir(path, expected_bytes=size) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        text = json.dumps({"format_version": FORMAT_VERSION, **cfg.to_json()}, indent=2)
        (tmp / CFG_FILE).write_text(text + "\n")
    log.debug("saved %s dictionary to %s", cfg.architecture, path)
    return path


# -- loading -----------------------------------------------------------------------------------
def load_dictionary(
    path_or_repo: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = None,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
) -> Dictionary:
    """Load a dictionary from a local directory (ours, SAELens, sparsify, Gemma Scope) or a
    Hugging Face hub repo id (`org/name`, optionally `org/name/sub/folder`).

    An existing local path always wins over a repo id of the same spelling. `dtype` casts after
    loading (default: the dtype stored in the file).
    """
    from sae import formats

    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise UserError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype]
    root = resolve_path(path_or_repo, subfolder=subfolder, revision=revision)
    d = formats.load_any(root).to(device=device, dtype=dtype)
    d.cfg.dtype = dtype_name(d.dtype)  # describe the module as loaded, not as stored
    return d


def load_native(root: Path) -> Dictionary:
    """Read our own format (see the module docstring), validating every field."""
    cfg_path = root / CFG_FILE
    raw = read_json(cfg_path)
    version = raw.pop("format_version", None)
    if version is None:
        raise DictionaryFormatError(cfg_path, "format_version", "missing required field")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DictionaryFormatError(cfg_path, "format_version", f"not a version: {version!r}")
    if version > FORMAT_VERSION:
        raise DictionaryFormatError(
            cfg_path,
            "format_version",
            f"written by a newer version of this package (format {version}, this reads "
            f"<= {FORMAT_VERSION}); upgrade the package",
        )
    cfg = config_from_json(cfg_path, raw)
    d = build_checked(cfg_path, cfg)
    weights_path = root / WEIGHTS_FILE
    assign_weights(weights_path, d, read_safetensors(weights_path), DTYPES[cfg.dtype])
    return d


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DictionaryFormatError(path, None, "missing file")
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DictionaryFormatError(
            path, None, f"malformed JSON at line {e.lineno} column {e.colno}: {e.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DictionaryFormatError(path, None, f"cannot read: {e}") from None
    if not isinstance(obj, dict):
        raise DictionaryFormatError(path, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise DictionaryFormatError(path, None, "missing file")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, RuntimeError, TypeError, ValueError) as e:
        raise DictionaryFormatError(path, None, f"not a readable safetensors file: {e}") from None


def config_from_json(cfg_path: Path, raw: Mapping[str, Any]) -> DictionaryConfig:
    """Validate the cfg.json fields one by one and build the config (unknown fields: warning)."""
    known = {f.name: f for f in dataclasses.fields(DictionaryConfig)}
    for name in known:
        f = known[name]
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in raw:
            raise DictionaryFormatError(cfg_path, name, "missing required field")
    extra = sorted(set(raw) - set(known))
    if extra:
        log.warning("%s: ignoring unknown fields %s", cfg_path, ", ".join(extra))
    values = {k: v for k, v in raw.items() if k in known}

    def bad(field: str, want: str) -> DictionaryFormatError:
        return DictionaryFormatError(cfg_path, field, f"expected {want}, got {values[field]!r}")

    for name in ("d_in", "d_sae", "d_out"):
        v = values.get(name)
        if name == "d_out" and v is None:
            continue
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(name, "a positive integer" + (" or null" if name == "d_out" else ""))
    if not isinstance(values["architecture"], str):
        raise bad("architecture", "a string")
    if "dtype" in values and values["dtype"] not in DTYPES:
        raise DictionaryFormatError(
            cfg_path,
            "dtype",
            f"unsupported dtype {values['dtype']!r}; supported: {', '.join(DTYPES)}",
        )
    for name in ("hook_name", "model_name", "hook_name_out"):
        if values.get(name) is not None and not isinstance(values[name], str):
            raise bad(name, "a string or null")
    k = values.get("k")
    if k is not None and (
        not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= values["d_sae"]
    ):
        raise bad("k", f"an integer in [1, d_sae={values['d_sae']}] or null")
    for name in ("apply_b_dec_to_input", "skip"):
        if name in values and not isinstance(values[name], bool):
            raise bad(name, "true or false")
    for name in ("normalization", "provenance"):
        if name in values and not isinstance(values[name], dict):
            raise bad(name, "a JSON object")
    return DictionaryConfig(**values)


def build_checked(cfg_path: Path, cfg: DictionaryConfig) -> Dictionary:
    """`build` with its failures reported against cfg.json."""
    try:
        arch = architecture_class(cfg.architecture)
    except ValueError as e:
        raise DictionaryFormatError(cfg_path, "architecture", str(e)) from None
    if arch.needs_k and cfg.k is None:
        raise DictionaryFormatError(cfg_path, "k", f"required for architecture {cfg.architecture}")
    try:
        return build(cfg)
    except ValueError as e:
        raise DictionaryFormatError(cfg_path, None, str(e)) from None


def assign_weights(
    weights_path: Path, d: Dictionary, tensors: Mapping[str, Tensor], dtype: torch.dtype
) -> None:
    """Check names, shapes, dtypes and finiteness of `tensors`, then load them into `d`."""
    expected = d.state_dict()
    for name, ref in expected.items():
        if name not in tensors:
            raise DictionaryFormatError(
                weights_path, name, f"missing tensor (expected shape {list(ref.shape)})"
            )
    for name in tensors:
        if name not in expected:
            raise DictionaryFormatError(
                weights_path,
                name,
                f"unexpected tensor for architecture {d.cfg.architecture!r} "
                f"(expected {', '.join(expected)})",
            )
    for name in expected:  # in the module's order: W_enc first, as users read the shapes
        t = tensors[name]
        if t.dtype not in DTYPES.values():
            raise DictionaryFormatError(
                weights_path,
                name,
                f"unsupported dtype {t.dtype}; supported: {', '.join(DTYPES)}",
            )
        if t.dtype != dtype:
            raise DictionaryFormatError(
                weights_path,
                name,
                f"dtype {dtype_name(t.dtype)} but cfg.json says {dtype_name(dtype)}",
            )
        want = tuple(expected[name].shape)
        if tuple(t.shape) != want:
            raise DictionaryFormatError(
                weights_path,
                name,
                f"shape {list(t.shape)} but cfg.json (d_in={d.d_in}, d_sae={d.d_sae}"
                + (f", d_out={d.d_out}" if d.cfg.is_transcoder else "")
                + f") implies {list(want)}",
            )
        if not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise DictionaryFormatError(weights_path, name, f"contains {kind} values")
    d.to(dtype)
    d.load_state_dict(dict(tensors), strict=True)


def check_float(path: Path, name: str, t: Tensor) -> Tensor:
    """A foreign tensor must be a supported float dtype before we cast it anywhere."""
    if t.dtype not in DTYPES.values():
        raise DictionaryFormatError(
            path, name, f"unsupported dtype {t.dtype}; supported: {', '.join(DTYPES)}"
        )
    return t


def expect_shape(path: Path, name: str, t: Tensor, shape: tuple[int, ...], what: str) -> Tensor:
    """Shape check for foreign layouts, naming the tensor as the source file spells it."""
    if tuple(t.shape) != shape:
        raise DictionaryFormatError(
            path, name, f"shape {list(t.shape)} but expected {list(shape)} ({what})"
        )
    return t


def require_tensor(path: Path, tensors: Mapping[str, Tensor], name: str) -> Tensor:
    if name not in tensors:
        raise DictionaryFormatError(
            path, name, f"missing tensor (file has: {', '.join(sorted(tensors)) or 'nothing'})"
        )
    return tensors[name]


# -- where the files are -----------------------------------------------------------------------
def resolve_path(
    path_or_repo: str | Path, *, subfolder: str | None = None, revision: str | None = None
) -> Path:
    """A local directory for `path_or_repo`: the path itself if it exists, else a hub snapshot."""
    local = Path(path_or_repo).expanduser()
    if local.exists():
        return local / subfolder if subfolder else local
    text = str(path_or_repo)
    if not isinstance(path_or_repo, Path) and _REPO_ID.fullmatch(text):
        org, name, *rest = text.split("/")
        sub = "/".join([*rest, *([subfolder] if subfolder else [])]) or None
        return _hub_snapshot(f"{org}/{name}", sub, revision)
    raise DictionaryFormatError(local, None, "no such file or directory")


def _hub_snapshot(repo_id: str, subfolder: str | None, revision: str | None) -> Path:
    """Download (or find in the local cache) only `subfolder` of a hub repo."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    sub = subfolder.strip("/") if subfolder else None
    what = f"hub repo {repo_id!r}" + (f" subfolder {sub!r}" if sub else "")
    try:
        snapshot = snapshot_download(
            repo_id, revision=revision, allow_patterns=[f"{sub}/*"] if sub else None
        )
    except LocalEntryNotFoundError:
        raise UserError(
            f"{what}: not a local path, and the hub is unreachable (offline, e.g. "
            "HF_HUB_OFFLINE=1, or no network) with no copy in the local cache; download it "
            "once while online or pass a local directory"
        ) from None
    except GatedRepoError:
        raise UserError(f"{what}: gated repo; accept its licence and log in") from None
    except RepositoryNotFoundError:
        raise UserError(f"{what}: no such local path or hub repo (or it is private)") from None
    except RevisionNotFoundError:
        raise UserError(f"{what}: no revision {revision!r}") from None
    except HFValidationError as e:
        raise UserError(f"{what}: not a valid repo id: {e}") from None
    except OSError as e:  # network failures and other hub HTTP errors
        raise UserError(f"{what}: download failed: {e}") from None
    root = Path(snapshot) / sub if sub else Path(snapshot)
    if not root.exists():
        raise DictionaryFormatError(root, None, f"{what}: no such subfolder in the repo")
    return root
