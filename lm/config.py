"""The configuration of `sae train-lm` (lm/train.py): every setting of one run,
and the hash that names the run's work directory so that only the same run resumes there.

The `sae train-lm` flags and their help are generated from `TrainLMConfig`
(sae/dataclass_cli.py); the measured results behind its defaults are in the README's
"The bundled model" section and the model card.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from activations.model import BUNDLED_DIR
from lm.optim import OPTIMIZERS

AutocastDtype = Literal["auto", "bfloat16", "float16", "float32"]
if TYPE_CHECKING:
    OptimizerName = str
else:
    # Choices come from the optimizer registry, never a hand-copied list (DESIGN.md).
    OptimizerName = Literal[tuple(OPTIMIZERS)]


@dataclass(frozen=True)
class TrainLMConfig:
    out: Path = BUNDLED_DIR
    """Output Hugging Face model directory; replaced atomically when training ends."""
    work_dir: Path | None = None
    """Checkpoints and tokenized corpus (default: ~/.cache/sae/train-lm/<config hash>)."""
    vocab_size: int = 4096
    """BPE vocabulary size including the <|endoftext|> token (4096 keeps the unembedding, the
    dominant cost of a one-layer model, cheap on CPU)."""
    d_model: int = 128
    """Residual stream width."""
    d_mlp: int = 512
    """MLP neurons (the layer dictionaries are trained on)."""
    n_heads: int = 4
    """Attention heads."""
    n_layers: int = 1
    """Transformer blocks."""
    tie_embeddings: bool = False
    """Share the unembedding with the token embedding (GPT-2's default). Off: in a one-layer
    model the direct path W_U W_E carries the bigram statistics ("A Mathematical Framework for
    Transformer Circuits", 2021), which tying forces to be symmetric."""
    n_ctx: int = 256
    """Context length in tokens, BOS included."""
    batch_size: int = 32
    """Contexts per optimizer step."""
    steps: int = 9000
    """Optimizer steps; tokens seen = steps * batch_size * n_ctx. 9,000 steps (74M tokens,
    about 9 epochs of the train split) fit a ~30-minute budget on 2 cores with native bf16."""
    optimizer: OptimizerName = "muon"
    """muon: Muon on the block's matrices and AdamW on the embeddings, unembedding and vectors,
    sharing one learning rate (lm/optim.py); or adamw on everything."""
    lr: float = 6e-3
    """Peak learning rate (Muon's steps are scaled to match AdamW's RMS, so one serves both;
    with adamw alone, 3e-3 suits this model better)."""
    warmup_steps: int = 100
    """Linear warm-up steps before the cosine decay."""
    min_lr_ratio: float = 0.1
    """The cosine decays to lr * min_lr_ratio at the last step."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on matrices (not on biases or LayerNorm gains)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables)."""
    seed: int = 0
    """Seed for initialisation and batch sampling."""
    threads: int = 2
    """torch CPU threads (the project's reference machine has 2 cores)."""
    device: str = "cpu"
    """torch device to train on."""
    dropout: float = 0.0
    """Dropout on the embeddings and on what attention and MLP write to the residual stream
    (GPT-2 uses 0.1). Off by default: within the fixed time budget it costs more validation
    loss than it saves, and the train/validation gap comes mostly from harder validation
    files, not memorisation (figures in the README). Attention probabilities are never
    dropped: dropping them would keep SDPA off its fused kernel."""
    autocast: AutocastDtype = "auto"
    """Autocast dtype of the training forward pass: auto, bfloat16, float16 (CUDA) or float32
    (off). Weights and optimizer state stay float32. `auto` takes bfloat16 where the hardware
    computes in it natively (a CUDA GPU with bf16, a CPU with AVX512-BF16 or AMX) and float32
    elsewhere: on an AVX2-only CPU, bf16 is emulated and slower than float32
    (benchmarks/bench_train_lm.py). The model card records the dtype `auto` resolved to."""
    compile: bool = True
    """torch.compile the model for training (needs a C++ compiler on CPU, Triton on CUDA); it
    fuses the loss over the vocabulary-wide unembedding (benchmarks/bench_train_lm.py measures
    the step time with and without)."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps."""
    max_docs: int | None = None
    """Use only the first N documents of each split (quick smoke runs)."""
    eval_batch_size: int = 64
    """Contexts per forward pass when measuring validation loss."""
    eval_stride: int | None = None
    """Validation windows advance by this many tokens and score only their last eval_stride
    targets, so every validation token (but those of the first window) is predicted from at
    least n_ctx - 1 - eval_stride tokens of context, as in Hugging Face's "Perplexity of
    fixed-length models". None: half the window, (n_ctx - 1) // 2, at twice the cost of
    non-overlapping windows. n_ctx - 1 gives non-overlapping windows, whose first targets
    are predicted from almost nothing; the model card reports that figure too."""
    sample_tokens: int = 32
    """Greedy tokens generated after each prompt for the model card."""

    def __post_init__(self) -> None:
        positive = ("vocab_size", "d_model", "d_mlp", "n_heads", "n_layers", "batch_size")
        for name in (*positive, "steps", "checkpoint_every", "eval_batch_size", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size < 257:
            raise ValueError("vocab_size must exceed 256 (the byte alphabet plus <|endoftext|>)")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.n_ctx < 2:
            raise ValueError("n_ctx must be at least 2")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("min_lr_ratio must be in [0, 1]")
        if self.autocast not in get_args(AutocastDtype):
            raise ValueError(f"autocast must be one of {', '.join(get_args(AutocastDtype))}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}")
        if self.max_docs is not None and self.max_docs <= 0:
            raise ValueError("max_docs must be positive")
        if self.eval_stride is not None and not 1 <= self.eval_stride <= self.n_ctx - 1:
            raise ValueError(f"eval_stride must be in [1, n_ctx - 1 = {self.n_ctx - 1}]")

    @property
    def stride(self) -> int:
        """The validation stride in force (`eval_stride`, or half the window)."""
        return self.eval_stride if self.eval_stride is not None else max(1, (self.n_ctx - 1) // 2)


def native_bf16(device: str) -> bool:
    """Whether `device` computes bf16 matmuls in hardware rather than by emulation."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_autocast(cfg: TrainLMConfig) -> TrainLMConfig:
    """`cfg` with `autocast="auto"` made concrete for this machine, so that the run's hash,
    metrics and model card name the dtype that was actually used."""
    if cfg.autocast != "auto":
        return cfg
    return replace(cfg, autocast="bfloat16" if native_bf16(cfg.device) else "float32")


def config_hash(cfg: TrainLMConfig) -> str:
    """Identity of a run: everything that changes the result, plus the interpreter's stdlib."""
    from sae.dataclass_cli import to_dict

    keep = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "work_dir", "threads")}
    # Settings that do not change the trained weights may differ on resume.
    keep["checkpoint_every"] = None
    keep.pop("sample_tokens")
    keep.pop("eval_stride")
    keep["python"] = sys.version.split()[0]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]
