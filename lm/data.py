"""The data of `sae train-lm` (lm/train.py): a byte-level BPE tokenizer trained on
the stdlib corpus, the token streams of both splits (cached in the work directory), and the
training and validation windows cut from them, each starting with BOS as `to_tokens` does.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Int

from lm.config import TrainLMConfig
from sae.errors import UserError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

EOT = "<|endoftext|>"


def train_tokenizer(texts: list[str], vocab_size: int, n_ctx: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (GPT-2 style, no prefix space) with <|endoftext|> as BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOT,
        eos_token=EOT,
        model_max_length=n_ctx,
        clean_up_tokenization_spaces=False,
    )


def tokenize_stream(tokenizer: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """One uint16/int32 stream: `<|endoftext|>` then the tokens of each document, in order."""
    bos = tokenizer.bos_token_id
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    dtype = np.uint16 if len(tokenizer) <= 65536 else np.int32
    parts = [np.asarray([bos, *enc.ids], dtype=dtype) for enc in encodings]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def sample_batch(
    stream: np.ndarray, bos: int, cfg: TrainLMConfig, step: int
) -> Int[torch.Tensor, "B S"]:
    """Random windows of n_ctx - 1 tokens, each with BOS prepended; a function of the step."""
    rng = np.random.default_rng([cfg.seed, step])
    starts = rng.integers(0, len(stream) - (cfg.n_ctx - 1), size=cfg.batch_size)
    windows = np.stack([stream[s : s + cfg.n_ctx - 1] for s in starts]).astype(np.int64)
    return torch.cat(
        [torch.full((cfg.batch_size, 1), bos, dtype=torch.long), torch.from_numpy(windows)], 1
    )


class ValidationWindows(NamedTuple):
    """Windows over the validation stream and the targets each of them scores."""

    contexts: Int[torch.Tensor, "W S"]
    """BOS + n_ctx - 1 consecutive stream tokens, the shape of a training context."""
    first_scored: Int[torch.Tensor, " W"]
    """Index, among the window's n_ctx - 1 targets, of the first one it scores. Over all
    windows every token of the stream is scored exactly once."""

    def targets(self) -> Int[torch.Tensor, " T"]:
        """The scored tokens, in stream order."""
        return torch.cat(
            [c[1 + int(f) :] for c, f in zip(self.contexts, self.first_scored, strict=True)]
        )


def validation_windows(stream: np.ndarray, bos: int, n_ctx: int, stride: int) -> ValidationWindows:
    """Sliding windows that advance by `stride` tokens, each scoring only targets no earlier
    window scored, so that every token but those of the first window is predicted from at
    least n_ctx - 1 - stride tokens of context (the sliding-window evaluation of Hugging Face's
    "Perplexity of fixed-length models"). stride = n_ctx - 1 gives non-overlapping windows.
    A last window ends at the end of the stream, so no tail is dropped."""
    body = n_ctx - 1
    if len(stream) < body:
        raise UserError(f"the validation split has fewer than {body} tokens")
    if not 1 <= stride <= body:
        raise ValueError(f"stride must be in [1, {body}], got {stride}")
    starts = list(range(0, len(stream) - body + 1, stride))
    if starts[-1] != len(stream) - body:
        starts.append(len(stream) - body)
    first = [0] + [prev + body - start for prev, start in itertools.pairwise(starts)]
    body_WS = np.lib.stride_tricks.sliding_window_view(stream, body)[starts].astype(np.int64)
    contexts = torch.cat(
        [torch.full((len(starts), 1), bos, dtype=torch.long), torch.from_numpy(body_WS)], 1
    )
    return ValidationWindows(contexts, torch.tensor(first, dtype=torch.long))


class PreparedData(NamedTuple):
    """The tokenizer and the two token streams of a run."""

    tokenizer: PreTrainedTokenizerFast
    train: np.ndarray
    validation: np.ndarray
    corpus: dict[str, Any]


def prepare_data(cfg: TrainLMConfig, work: Path) -> PreparedData:
    """Train the tokenizer and tokenize both splits, or reuse them from the work directory."""
    from transformers import PreTrainedTokenizerFast

    from activations.corpus import iter_files
    from sae.atomic import atomic_dir, atomic_path, atomic_write_json

    tok_dir, info_path = work / "tokenizer", work / "corpus.json"
    if tok_dir.is_dir() and info_path.is_file():
        tokenizer = PreTrainedTokenizerFast.from_pretrained(tok_dir)
        streams = {s: np.load(work / f"{s}.npy") for s in ("train", "validation")}
        logger.info("reusing tokenizer and token streams from %s", work)
        return PreparedData(
            tokenizer, streams["train"], streams["validation"], json.loads(info_path.read_text())
        )

    docs = {
        split: list(itertools.islice(iter_files(split), cfg.max_docs))
        for split in ("train", "validation")
    }
    if not docs["train"] or not docs["validation"]:
        raise UserError("the standard-library corpus is empty: no .py files found")
    started = time.perf_counter()
    texts = {split: [d.text for d in ds] for split, ds in docs.items()}
    logger.info("training a %d-token BPE on %d documents", cfg.vocab_size, len(texts["train"]))
    tokenizer = train_tokenizer(texts["train"], cfg.vocab_size, cfg.n_ctx)
    streams = {split: tokenize_stream(tokenizer, t) for split, t in texts.items()}
    corpus = {
        "source": "python standard library (activations/corpus.py)",
        "python": sys.version.split()[0],
        "tokenizer_seconds": round(time.perf_counter() - started, 1),
        **{f"{s}_documents": len(d) for s, d in docs.items()},
        **{f"{s}_characters": sum(len(t) for t in texts[s]) for s in texts},
        **{f"{s}_tokens": len(streams[s]) for s in streams},
    }
    with atomic_dir(tok_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    for split, stream in streams.items():
        with atomic_path(work / f"{split}.npy") as tmp_path, open(tmp_path, "wb") as fh:
            np.save(fh, stream)
    atomic_write_json(info_path, corpus)
    return PreparedData(tokenizer, streams["train"], streams["validation"], corpus)
