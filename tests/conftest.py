"""Shared fixtures: a tiny, randomly initialised GPT-2 saved as a local Hugging Face
directory (weights + tokenizer), so tests exercise the real loading path with no hub."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "import os\nimport sys\n\nprint(os.getcwd())\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "# a comment about numbers 1 2 3 42\nx = [i * 2 for i in range(10)]\n",
    "for line in open('f.txt'):\n    if line.strip():\n        yield line\n",
]


def make_tiny_lm_dir(path: Path, d_model: int = 32, n_inner: int = 64, n_ctx: int = 64) -> Path:
    """Write a 1-layer GPT-2 with a byte-level BPE tokenizer to `path`; returns `path`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TINY_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    eot = tok.token_to_id("<|endoftext|>")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=n_ctx,
        n_embd=d_model,
        n_layer=1,
        n_head=2,
        n_inner=n_inner,
        bos_token_id=eot,
        eos_token_id=eot,
    )
    model = GPT2LMHeadModel(cfg)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local HF directory of a tiny 1-layer GPT-2 (d_model 32, MLP 64, context 64)."""
    return make_tiny_lm_dir(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def bundled():
    """The bundled model, loaded once for the whole session."""
    from activations.model import BUNDLED_MODEL, load_model

    return load_model(BUNDLED_MODEL)


@pytest.fixture(scope="module")
def tiny_model(tiny_lm_dir: Path):
    """The tiny GPT-2 loaded through the TransformerBridge, once per module."""
    from activations.model import load_model

    return load_model(str(tiny_lm_dir))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny matmuls on a shared 2-core box: a second OpenMP thread only adds spin-waiting
    (measured 17x slower under load), so modules that ask for this run torch on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
