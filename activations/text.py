"""Text in, fixed-length token contexts out: the one tokenize-and-pack used by `sae cache`,
the no-disk activation stream and `sae analyze`.

Sources (`TextConfig.dataset`):
- "bundled": the Python standard library corpus shipped with the package (`activations.corpus`);
- a local file or folder: text-like files (.txt .md .py .rst ...) read one document per file
  (or per paragraph / line), and .jsonl / .json / .csv / .parquet through `datasets`;
- anything else: a Hugging Face dataset name, loaded with `datasets.load_dataset` (streaming by
  default). A local folder of JSONL / CSV / Parquet files takes the same path, which is how the
  tests exercise it offline.
An already tokenized dataset is read from `token_column` (lists of ids) instead of `text_column`.

Packing (the convention of SAELens's `concat_and_batch_sequences` and of GPT-2 pre-training):
documents are tokenized without special tokens, each is followed by EOS, and the token stream is
cut into contexts of `context_size` tokens, each starting with BOS. A document longer than a
context continues in the next one. Documents pass through a seeded shuffle buffer, so the
context stream is a deterministic function of (dataset, tokenizer, config).
"""

from __future__ import annotations

import itertools
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Int
from torch import Tensor

from sae.errors import UserError

logger = logging.getLogger(__name__)

BUNDLED = "bundled"

TEXT_SUFFIXES = frozenset({".txt", ".text", ".md", ".rst", ".py", ".c", ".h", ".js", ".html"})
"""Files read as raw text, one document each (see `TextConfig.sample_by`)."""

DATASET_SUFFIXES = {
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
"""Files read through a `datasets` packaged builder, keyed by suffix."""

Document = str | list[int]
"""A document is its text, or its token ids when the dataset is already tokenized."""


@dataclass
class TextConfig:
    """Where the text comes from and how it is cut into contexts."""

    dataset: str = BUNDLED
    """'bundled' (the Python standard library corpus), a local file or folder (text, JSONL,
    CSV, Parquet), or a Hugging Face dataset name."""
    dataset_config: str | None = None
    """Configuration (subset) name of a Hugging Face dataset, e.g. wikitext-103-raw-v1."""
    split: str = "train"
    """Dataset split. The bundled corpus has train and validation; local files have only train."""
    text_column: str = "text"
    """Column holding the text of each document."""
    token_column: str | None = None
    """Column holding already tokenized documents (lists of token ids); when set, the text
    column is ignored and no tokenizer runs."""
    streaming: bool = True
    """Stream a Hugging Face dataset instead of downloading and converting it whole first."""
    sample_by: Literal["document", "paragraph", "line"] = "document"
    """How plain-text files are cut into documents: whole file, blank-line paragraphs, lines."""
    context_size: int = 128
    """Tokens per context, BOS included; at most the model's context length."""
    batch_size: int = 32
    """Contexts per forward pass."""
    shuffle_buffer: int = 1000
    """Documents held in the seeded shuffle buffer; 0 keeps the dataset order."""
    seed: int = 0
    """Seed of the document shuffle: same seed, same contexts."""

    def __post_init__(self) -> None:
        if self.context_size < 2:
            raise ValueError(
                f"context_size must be at least 2 (BOS + a token), got {self.context_size}"
            )
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {self.shuffle_buffer}")


class ContextBatch(NamedTuple):
    """Contexts of one forward pass and their indices in the (global) context stream."""

    sequence: Int[Tensor, " S"]
    """Index of each context in the stream of all contexts, counted from 0 across all ranks."""
    tokens: Int[Tensor, "S T"]


# -- sources ---------------------------------------------------------------------------------


def _looks_like_path(name: str) -> bool:
    p = Path(name).expanduser()
    return (
        p.exists()
        or name.startswith((".", "/", "~"))
        or p.suffix.lower() in (TEXT_SUFFIXES | DATASET_SUFFIXES.keys())
    )


def _files_of(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"{path} holds no files to read")
    return files


def _split_text(text: str, sample_by: str) -> Iterator[str]:
    if sample_by == "document":
        pieces: Iterable[str] = [text]
    elif sample_by == "paragraph":
        pieces = text.split("\n\n")
    else:
        pieces = text.splitlines()
    for piece in pieces:
        if piece.strip():
            yield piece


def _read_text_files(files: list[Path], sample_by: str) -> Iterator[str]:
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {f}: {_first_line(e)}") from None
        yield from _split_text(text.replace("\r\n", "\n"), sample_by)


def _load_hf(cfg: TextConfig, data_files: list[str] | None = None, builder: str | None = None):
    """`datasets.load_dataset` for a hub name (or local dataset folder) or packaged files."""
    import datasets

    where = cfg.dataset
    try:
        if data_files is not None:
            return datasets.load_dataset(
                builder, data_files=data_files, split="train", streaming=True
            )
        return datasets.load_dataset(
            cfg.dataset, cfg.dataset_config, split=cfg.split, streaming=cfg.streaming
        )
    except datasets.exceptions.DatasetNotFoundError as e:
        raise UserError(f"dataset {where!r} not found: {_first_line(e)}") from None
    except ConnectionError as e:
        raise UserError(
            f"dataset {where!r} is not reachable offline and not in the local cache: "
            f"{_first_line(e)}"
        ) from None
    except Exception as e:  # corrupt files, bad configs: datasets raises many kinds
        raise UserError(f"cannot read dataset {where}: {_first_line(e)}") from None


def _rows_of(dataset: Any, cfg: TextConfig, where: str) -> Iterator[Document]:
    column = cfg.token_column or cfg.text_column
    rows = iter(dataset)
    first = True
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except UserError:
            raise
        except Exception as e:  # a corrupt or unreadable file surfaces on first read
            raise UserError(f"cannot read {where}: {_first_line(e)}") from None
        if first and column not in row:
            kind = "token" if cfg.token_column else "text"
            raise UserError(
                f"{where} has no {kind} column {column!r}; its columns are: "
                f"{', '.join(map(str, row))}"
            )
        first = False
        value = row[column]
        if cfg.token_column:
            yield [int(t) for t in value]
        elif value:
            yield str(value)


def _check_bundled_options(cfg: TextConfig) -> None:
    """UserError for options the bundled corpus cannot honour (a token column, a third split)."""
    if cfg.token_column:
        raise UserError("the bundled corpus is text; --token-column does not apply to it")
    if cfg.split not in ("train", "validation"):
        raise UserError(f"the bundled corpus has splits train and validation, not {cfg.split!r}")


def open_documents(cfg: TextConfig) -> Iterator[Document]:
    """The documents of the configured source, in dataset order (not yet shuffled)."""
    if cfg.dataset == BUNDLED:
        from activations.corpus import iter_documents

        _check_bundled_options(cfg)
        return iter_documents(cfg.split)  # type: ignore[arg-type]
    path = Path(cfg.dataset).expanduser()
    if not path.exists():
        if _looks_like_path(cfg.dataset):
            raise UserError(f"cannot read {cfg.dataset}: no such file or directory")
        return _rows_of(_load_hf(cfg), cfg, f"dataset {cfg.dataset!r}")
    files = _files_of(path)
    kinds = {DATASET_SUFFIXES.get(f.suffix.lower(), "text") for f in files}
    if len(kinds) > 1:
        raise UserError(f"{path} mixes file kinds ({', '.join(sorted(kinds))}); use one kind")
    (kind,) = kinds
    if kind == "text":
        if cfg.token_column:
            raise UserError(f"{path} holds plain text; --token-column needs JSONL/CSV/Parquet")
        return _read_text_files(files, cfg.sample_by)
    if path.is_dir():
        # A folder of data files is exactly what a hub dataset repo is: take the hub path.
        hub_cfg = TextConfig(**{**vars(cfg), "dataset": str(path), "split": "train"})
        return _rows_of(_load_hf(hub_cfg), cfg, str(path))
    return _rows_of(_load_hf(cfg, [str(f) for f in files], kind), cfg, str(path))


def check_source(cfg: TextConfig) -> None:
    """Open the source and read its first document, so a bad dataset fails before any work."""
    if cfg.dataset == BUNDLED:
        # Options only: opening the corpus walks the whole standard library (~0.3 s).
        _check_bundled_options(cfg)
        return
    try:
        next(iter(open_documents(cfg)))
    except StopIteration:
        raise UserError(f"dataset {cfg.dataset!r} (split {cfg.split}) has no documents") from None


def shuffled(items: Iterable[Any], buffer_size: int, seed: int) -> Iterator[Any]:
    """A seeded shuffle buffer (as in `datasets.IterableDataset.shuffle`): deterministic."""
    if buffer_size <= 1:
        yield from items
        return
    rng = random.Random(seed)
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


# -- tokenize and pack -----------------------------------------------------------------------


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """(BOS, EOS) ids; a tokenizer with only one of them (GPT-2: <|endoftext|>) uses it twice."""
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    if bos is None and eos is None:
        raise UserError("the tokenizer has neither a BOS nor an EOS token to separate documents")
    return (bos if bos is not None else eos), (eos if eos is not None else bos)


def _token_docs(docs: Iterator[Document], tokenizer: Any, chunk: int = 16) -> Iterator[list[int]]:
    while True:
        batch = list(itertools.islice(docs, chunk))
        if not batch:
            return
        texts = [d for d in batch if isinstance(d, str)]
        encoded = (
            iter(tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"])
            if texts
            else iter(())
        )
        for d in batch:
            yield next(encoded) if isinstance(d, str) else d


def iter_contexts(cfg: TextConfig, tokenizer: Any) -> Iterator[list[int]]:
    """The packed context stream: each context is BOS + (context_size - 1) tokens."""
    bos, eos = special_ids(tokenizer)
    docs = shuffled(open_documents(cfg), cfg.shuffle_buffer, cfg.seed)
    body = cfg.context_size - 1
    pending: list[int] = []
    for ids in _token_docs(iter(docs), tokenizer):
        pending.extend(ids)
        pending.append(eos)
        while len(pending) >= body:
            yield [bos, *pending[:body]]
            del pending[:body]
    # The incomplete tail is dropped: every context has exactly context_size tokens.


def context_batches(
    cfg: TextConfig,
    tokenizer: Any,
    *,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    max_contexts: int | None = None,
) -> Iterator[ContextBatch]:
    """Batches of `cfg.batch_size` contexts of this rank, numbered in the global stream.

    Rank r takes global contexts r, r + world_size, ... (the union over ranks is the
    single-process stream); `start` skips that many of this rank's contexts without
    yielding them (resume); `max_contexts` bounds the global stream.
    """
    stream: Iterator[list[int]] = iter_contexts(cfg, tokenizer)
    if max_contexts is not None:
        stream = itertools.islice(stream, max_contexts)
    mine = itertools.islice(enumerate(stream), rank, None, world_size)
    mine = itertools.islice(mine, start, None)
    while True:
        chunk = list(itertools.islice(mine, cfg.batch_size))
        if not chunk:
            return
        yield ContextBatch(
            torch.tensor([i for i, _ in chunk], dtype=torch.long),
            torch.tensor([ids for _, ids in chunk], dtype=torch.long),
        )


def token_batches(
    cfg: TextConfig, tokenizer: Any, *, rank: int = 0, world_size: int = 1
) -> Iterator[Int[Tensor, "S T"]]:
    """Token contexts [batch_size, context_size] (the last batch may be smaller)."""
    for batch in context_batches(cfg, tokenizer, rank=rank, world_size=world_size):
        yield batch.tokens


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
