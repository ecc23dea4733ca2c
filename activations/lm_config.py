"""The configuration of `sae train-lm` (activations/train_lm.py): every setting of one run,
and the hash that names the run's work directory so that only the same run resumes there.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from activations.model import BUNDLED_DIR

AUTOCAST_DTYPES = ("bfloat16", "float16", "float32")


@dataclass(frozen=True)
class TrainLMConfig:
    out: Path = BUNDLED_DIR
    """Output Hugging Face model directory; replaced atomically when training ends."""
    work_dir: Path | None = None
    """Checkpoints and tokenized corpus (default: ~/.cache/sae/train-lm/<config hash>)."""
    vocab_size: int = 4096
    """BPE vocabulary size including the <|endoftext|> token (issue 3 asks for 4-8k; 4096
    keeps the unembedding, the dominant cost of a one-layer model, cheap on CPU)."""
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
    Transformer Circuits", 2021), which tying forces to be symmetric; untied, the same 800-step
    run reached validation CE 3.870 instead of 3.920 (issue 3)."""
    n_ctx: int = 256
    """Context length in tokens, BOS included."""
    batch_size: int = 32
    """Contexts per optimizer step."""
    steps: int = 6000
    """Optimizer steps; tokens seen = steps * batch_size * n_ctx."""
    lr: float = 3e-3
    """Peak learning rate of AdamW."""
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
    (GPT-2 uses 0.1). Off by default: the 6,000-step run without it memorises the train split
    (loss 2.53 on random train windows against 3.30 on validation), yet 0.1 for 5,000 steps
    (the same 30 minutes) reached a worse validation CE, 3.365 (issue 3). Attention
    probabilities are not dropped: that keeps SDPA off its fused kernel."""
    autocast: str = "bfloat16"
    """Autocast dtype of the training forward pass: bfloat16, float16 (CUDA) or float32 (off).
    Weights and optimizer state stay float32. On a CPU with native bf16 (AVX512-BF16, AMX) it
    is faster; on one without, float32 is."""
    compile: bool = True
    """torch.compile the model for training (needs a C++ compiler on CPU, Triton on CUDA).
    With bf16 it halved the step time on the reference machine (benchmarks/bench_train_lm.py)."""
    checkpoint_every: int = 100
    """Write a resumable checkpoint every this many steps."""
    max_docs: int | None = None
    """Use only the first N documents of each split (quick smoke runs)."""
    eval_batch_size: int = 64
    """Contexts per forward pass when measuring validation loss."""
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
        if self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_DTYPES)}")
        if self.max_docs is not None and self.max_docs <= 0:
            raise ValueError("max_docs must be positive")


def config_hash(cfg: TrainLMConfig) -> str:
    """Identity of a run: everything that changes the result, plus the interpreter's stdlib."""
    from sae.dataclass_cli import to_dict

    keep = {k: v for k, v in to_dict(cfg).items() if k not in ("out", "work_dir", "threads")}
    # Settings that do not change the trained weights may differ on resume.
    keep["checkpoint_every"] = None
    keep.pop("sample_tokens")
    keep["python"] = sys.version.split()[0]
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]
