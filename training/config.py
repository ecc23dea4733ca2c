"""Typed training configuration: one dataclass per concern, a docstring under each field.

The `sae train` flags are generated from these classes (sae/dataclass_cli.py), so this file is
the single source of truth for every option, its default and its help text. `__post_init__`
only validates; values that depend on the data (d_sae from an expansion factor, resampling
points from the run length) are resolved by the small `resolved_*` helpers below.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from training.objectives import OBJECTIVES

if TYPE_CHECKING:
    ObjectiveName = str
else:
    # Choices come from the objective registry, never a hand-copied list (DESIGN.md).
    ObjectiveName = Literal[tuple(sorted(OBJECTIVES))]


@dataclass
class DictionaryShape:
    """What dictionary is trained: its size and how it is initialised from the data."""

    d_sae: int | None = None
    """Number of dictionary features; give this or expansion_factor (default 8 x d_in)."""
    expansion_factor: float | None = None
    """d_sae as a multiple of d_in (used when d_sae is not given)."""
    b_dec_init: Literal["geometric_median", "mean", "zeros"] = "geometric_median"
    """Initial decoder bias: geometric median of a sample (Towards Monosemanticity), its mean, or 0."""
    normalize_inputs: bool = True
    """Scale inputs so their mean squared norm is d_in (scale folded into the saved weights)."""
    init_tokens: int = 8192
    """Tokens read at the start to estimate the input scale and initialise b_dec."""
    hook_name: str | None = None
    """Hook the activations came from (recorded in the saved dictionary's cfg.json)."""
    model_name: str | None = None
    """Language model the activations came from (recorded in cfg.json)."""

    def __post_init__(self) -> None:
        if self.d_sae is not None and self.expansion_factor is not None:
            raise ValueError("give d_sae or expansion_factor, not both")
        if self.d_sae is not None and self.d_sae < 1:
            raise ValueError(f"d_sae must be >= 1, got {self.d_sae}")
        if self.expansion_factor is not None and self.expansion_factor <= 0:
            raise ValueError(f"expansion_factor must be > 0, got {self.expansion_factor}")
        if self.init_tokens < 1:
            raise ValueError("init_tokens must be >= 1")

    def resolved_d_sae(self, d_in: int) -> int:
        if self.d_sae is not None:
            return self.d_sae
        return max(1, round((self.expansion_factor or 8.0) * d_in))


@dataclass
class TranscoderConfig:
    """Train a transcoder: a dictionary that reads one activation and reconstructs another,
    e.g. the MLP's normalised input and its output, so its features stand in for the MLP
    (Dunefsky, Chlenski & Nanda 2024; Anthropic's "Circuit Tracing", 2025)."""

    target: str | None = None
    """Hook to reconstruct, e.g. blocks.0.hook_mlp_out, from the input hook (--hook, e.g.
    blocks.0.ln2.hook_normalized); both from the same cache (one `sae cache` of both hooks).
    Unset: a sparse autoencoder of the input hook. From a model, write pairs in --hooks as
    INPUT:TARGET instead."""
    skip: bool = False
    """Add a linear skip connection W_skip [d_in, d_out], zero-initialised and trained with
    the rest (skip transcoders, Paulo, Shabalin & Belrose 2025)."""


@dataclass
class ObjectiveConfig:
    """The training objective (loss, constraints, how the dictionary is saved)."""

    name: ObjectiveName = "relu_l1"
    """relu_l1 (2023), relu_l1_2024 (April 2024 update), topk_auxk, batchtopk, jumprelu,
    matryoshka_batchtopk."""
    l1_coefficient: float = 5.0
    """Sparsity penalty weight: L1 for the relu objectives, L0 for jumprelu."""
    l1_warmup_fraction: float = 0.05
    """The sparsity penalty ramps linearly from 0 over this fraction of training."""
    target_l0: float | None = None
    """If set (relu/jumprelu), steer l1_coefficient during training toward this mean L0."""
    target_l0_rate: float = 0.01
    """Step size of the target-L0 controller in log(l1_coefficient) per step per log-ratio."""
    k: int = 32
    """Active features per token (topk) or mean active features per token (batchtopk)."""
    auxk_coefficient: float = 1 / 32
    """Weight of the AuxK loss on dead latents (Gao et al. 2024); 0 disables it.
    matryoshka_batchtopk multiplies it by its number of prefixes (its loss sums that many)."""
    auxk_k: int | None = None
    """Dead latents used by AuxK per token (default d_in // 2, as Gao et al.)."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens is dead for AuxK (Gao et al.: 10M)."""
    threshold_lr: float = 0.01
    """batchtopk: moving-average rate of the inference threshold estimate."""
    matryoshka_prefixes: tuple[float, ...] = (1 / 64, 1 / 16, 1 / 4, 1.0)
    """matryoshka_batchtopk: nested prefix widths as fractions of d_sae (the whole dictionary
    is always one of them); the loss sums the reconstruction error of each prefix. The
    default, 16 / 64 / 256 / 1,024 of a 1,024-wide dictionary, absorbed least on the
    realistic synthetic preset (README, "Choosing an architecture")."""
    matryoshka_prefix_codes: Literal["own", "shared"] = "shared"
    """matryoshka_batchtopk: "shared": one BatchTopK over the whole dictionary, each prefix
    decoding the codes that fall in it (Bussmann et al. 2025). "own": each prefix keeps its
    own k*B largest activations, so its latents must reconstruct alone with k codes a sample
    (SAELens's trainer); a little better F1 on the realistic preset at about 0.7x the
    samples/s."""
    jumprelu_bandwidth: float = 0.001
    """jumprelu: width of the straight-through rectangle kernel (Rajamanoharan et al.)."""
    jumprelu_init_threshold: float = 0.001
    """jumprelu: initial threshold of every feature."""
    decoder_init_norm: float = 0.1
    """relu_l1_2024: initial decoder row norm (Anthropic April 2024 update uses 0.1)."""

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.name!r}; known: {', '.join(OBJECTIVES)}")
        if self.l1_coefficient < 0:
            raise ValueError("l1_coefficient must be >= 0")
        if not 0 <= self.l1_warmup_fraction <= 1:
            raise ValueError("l1_warmup_fraction must be in [0, 1]")
        if self.target_l0 is not None and self.target_l0 <= 0:
            raise ValueError("target_l0 must be > 0")
        if self.k < 1:
            raise ValueError("k must be >= 1")
        if not self.matryoshka_prefixes or not all(0 < f <= 1 for f in self.matryoshka_prefixes):
            raise ValueError("matryoshka_prefixes must be fractions of d_sae in (0, 1]")
        if self.jumprelu_bandwidth <= 0:
            raise ValueError("jumprelu_bandwidth must be > 0")
        if self.matryoshka_prefix_codes not in ("own", "shared"):
            raise ValueError("matryoshka_prefix_codes must be 'own' or 'shared'")


@dataclass
class OptimConfig:
    """Adam with linear warm-up, optional decay, and gradient clipping."""

    lr: float = 4e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    eps: float = 1e-8
    """Adam epsilon."""
    warmup_steps: int = 100
    """Linear learning-rate warm-up from 0 over this many steps."""
    decay: Literal["none", "linear", "cosine"] = "linear"
    """Learning-rate decay after decay_start_fraction of training."""
    decay_start_fraction: float = 0.8
    """Decay starts at this fraction of training (Anthropic April 2024: the last 20%)."""
    min_lr_fraction: float = 0.0
    """Learning rate at the end of decay, as a fraction of lr."""
    grad_clip_norm: float | None = 1.0
    """Clip the global gradient norm to this value (None: no clipping)."""
    lazy: bool = False
    """Move a feature's parameters and Adam moments only on steps where it fired (lazy Adam,
    training/lazy_adam.py): rare features then take ordinary steps instead of amplified ones."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError("lr must be > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0:
            raise ValueError("warmup_steps must be >= 0")
        if not 0 <= self.decay_start_fraction <= 1 or not 0 <= self.min_lr_fraction <= 1:
            raise ValueError("decay_start_fraction and min_lr_fraction must be in [0, 1]")
        if self.grad_clip_norm is not None and self.grad_clip_norm <= 0:
            raise ValueError("grad_clip_norm must be > 0 (or None)")


@dataclass
class ResampleConfig:
    """Dead-feature resampling as in Towards Monosemanticity (Bricken et al. 2023, appendix
    "Neuron Resampling")."""

    enabled: bool | None = None
    """Resample dead features (default: on for relu_l1, the 2023 recipe; off for the others,
    relu_l1_2024 included)."""
    count: int = 4
    """Resampling points, evenly spaced after the sparsity warm-up: the stretch from its end to
    stop_fraction is cut into count + 1 equal parts and resampling happens at the inner cuts, so
    the first part is the first window and the last point lies before the stop."""
    every_tokens: int | None = None
    """Instead of count points: resample at every multiple of this many tokens before the stop."""
    window_tokens: int | None = None
    """A feature is dead if it has not fired for this many tokens (default: the spacing of the
    points)."""
    stop_fraction: float = 0.5
    """No resampling point at or after this fraction of training, so revived features settle."""
    sample_tokens: int = 131_072
    """Activations scored at each point to draw replacement inputs from, taken as random rows of
    every batch in the stretch of training just before it (Bricken et al. scored 819,200)."""
    encoder_scale: float = 0.2
    """New encoder rows get this times the mean encoder norm of alive features."""
    fire_fraction: float | None = None
    """Set each new feature's encoder bias so that it fires on this fraction of the scored
    sample (e.g. 0.005), instead of bias 0 (the paper's rule, under which a new feature fires
    on about half of the inputs whose direction it shares, and dies again under the L1 when that
    is too many)."""

    def __post_init__(self) -> None:
        if self.fire_fraction is not None and not 0 < self.fire_fraction < 1:
            raise ValueError("resample.fire_fraction must be in (0, 1)")
        if self.count < 1:
            raise ValueError("resample.count must be >= 1")
        if self.every_tokens is not None and self.every_tokens < 1:
            raise ValueError("every_tokens must be >= 1")
        if self.window_tokens is not None and self.window_tokens < 1:
            raise ValueError("window_tokens must be >= 1")
        if not 0 <= self.stop_fraction <= 1:
            raise ValueError("stop_fraction must be in [0, 1]")
        if self.sample_tokens < 1:
            raise ValueError("sample_tokens must be >= 1")


@dataclass
class LoggingConfig:
    """Where numbers go: metrics.jsonl always, W&B when enabled, PNG plots at the end."""

    log_every_steps: int = 50
    """Write training metrics every this many steps."""
    density_window_tokens: int | None = None
    """Feature density (dead/dense fractions, histogram) is measured over a trailing window of
    this many tokens after the sparsity warm-up (default: a quarter of the tokens after the
    warm-up, at most 1,000,000); rows before it fills report only density_tokens."""
    dense_threshold: float = 0.1
    """A feature firing on more than this fraction of tokens counts as dense."""
    eval_every_steps: int = 0
    """Run the held-out evaluation every this many steps too (0: only at the end)."""
    wandb: bool = False
    """Log to Weights & Biases (set WANDB_MODE=offline to log with no account)."""
    wandb_project: str = "sae"
    """W&B project name."""
    plots: bool = True
    """Draw loss, L0 and density-histogram PNGs in the run folder at the end."""
    progress: bool = True
    """Show a tqdm progress bar with the key numbers."""

    def __post_init__(self) -> None:
        if self.log_every_steps < 1:
            raise ValueError("log_every_steps must be >= 1")
        if self.density_window_tokens is not None and self.density_window_tokens < 1:
            raise ValueError("density_window_tokens must be >= 1")
        if self.eval_every_steps < 0:
            raise ValueError("eval_every_steps must be >= 0")


@dataclass
class EvalConfig:
    """Held-out evaluation: the final figures are measured on tokens the trainer never saw."""

    tokens: int | None = None
    """Held-out tokens. From the training cache: its last whole contexts, not trained on
    (default min(100,000, a tenth of the cache)); from `cache`: its first whole contexts
    (default all of them). "Never fired" is counted over all of them."""
    cache: str | None = None
    """A separate activation cache of held-out text to evaluate on, written by `sae cache` from
    the same model and hook, e.g. with `--text.split validation`: its documents are not in the
    training text, and the whole training cache is trained on. Default: hold out the training
    cache's last contexts."""
    loss_recovered: bool = True
    """Also splice the dictionary into the language model on the held-out contexts and
    report loss recovered and KL (needs the model the activations came from)."""

    def __post_init__(self) -> None:
        if self.tokens is not None and self.tokens < 1:
            raise ValueError("eval.tokens must be >= 1")

    def resolved_tokens(self, available: int) -> int:
        """Held-out tokens to take from `available` (the whole training cache or text)."""
        if self.tokens is not None:
            return self.tokens
        return max(1, min(100_000, available // 10))


@dataclass
class KLFinetuneConfig:
    """End-to-end fine-tuning after training (Braun et al. 2024): the KL divergence of the
    language model's next-token distribution with the reconstruction spliced in, from the
    clean one, added to the objective's loss (training/kl_finetune.py)."""

    tokens: int = 0
    """Tokens of whole training contexts to fine-tune on after the main training (0: off)."""
    coefficient: float = 1.0
    """Weight of the KL term, as a multiple of the objective's loss on the first batch."""
    lr_fraction: float = 0.02
    """Constant learning rate of the phase, as a fraction of optim.lr."""
    contexts_per_step: int = 8
    """Whole contexts per optimizer step."""

    def __post_init__(self) -> None:
        if self.tokens < 0 or self.contexts_per_step < 1:
            raise ValueError("kl_finetune.tokens must be >= 0 and contexts_per_step >= 1")
        if self.coefficient <= 0 or self.lr_fraction <= 0:
            raise ValueError("kl_finetune.coefficient and lr_fraction must be > 0")


@dataclass
class TrainConfig:
    """One training run (or, in a sweep, one member; run-level fields must then agree)."""

    total_tokens: int = 10_000_000
    """Stop after this many training tokens (or when the data ends)."""
    batch_size: int = 4096
    """Tokens per optimizer step (the global batch; split across processes under torchrun)."""
    out_dir: Path = Path("runs/sae")
    """Run folder: config.json, metrics.jsonl, checkpoint/, the dictionary, plots."""
    seed: int = 0
    """Seed of the dictionary initialisation and of resampling draws."""
    device: str = "auto"
    """cuda, cuda:1, mps, cpu, or auto (cuda > mps > cpu)."""
    autocast: Literal["none", "bf16", "auto"] = "none"
    """Run the forward pass under bf16 autocast (weights and optimizer stay float32); auto:
    bf16 where the device multiplies bf16 in hardware (recent GPUs, CPUs with AVX512-BF16 or
    AMX), else none."""
    compile: bool = False
    """torch.compile the dictionary's forward pass."""
    sparse_grad: bool = True
    """Backpropagate through the active codes only (relu, topk, batchtopk): the encoder and
    decoder gradients cost O(batch x L0 x d_in) instead of O(batch x d_sae x d_in). Exact (the
    dense gradients); steps with more than 1/8 of codes active run dense. false: always dense."""
    checkpoint_every_steps: int = 1000
    """Save the training state every this many steps (0: only at the end and on a signal)."""
    dictionary: DictionaryShape = field(default_factory=DictionaryShape)
    """Dictionary size and initialisation."""
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    """Training objective."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedules."""
    resample: ResampleConfig = field(default_factory=ResampleConfig)
    """Dead-feature resampling."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Metrics, W&B, plots, progress bar."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Held-out evaluation."""
    kl_finetune: KLFinetuneConfig = field(default_factory=KLFinetuneConfig)
    """End-to-end KL fine-tuning after training (needs the model: --cache with its model)."""
    transcoder: TranscoderConfig = field(default_factory=TranscoderConfig)
    """Reconstruct another hook than the input (a transcoder) and its skip connection."""

    def __post_init__(self) -> None:
        if self.total_tokens < 1 or self.batch_size < 1:
            raise ValueError("total_tokens and batch_size must be >= 1")
        if self.checkpoint_every_steps < 0:
            raise ValueError("checkpoint_every_steps must be >= 0")

    @property
    def total_steps(self) -> int:
        return math.ceil(self.total_tokens / self.batch_size)

    def resample_enabled(self) -> bool:
        if self.resample.enabled is not None:
            return self.resample.enabled
        return OBJECTIVES[self.objective.name].resamples

    def sparsity_warmup_tokens(self) -> int:
        """Tokens of the sparsity penalty's linear ramp (0 for objectives without one)."""
        if OBJECTIVES[self.objective.name].sparsity_penalty == "none":
            return 0
        return int(self.objective.l1_warmup_fraction * self.total_steps) * self.batch_size

    def density_window_tokens(self) -> int:
        if self.logging.density_window_tokens is not None:
            return self.logging.density_window_tokens
        after_warmup = self.total_tokens - self.sparsity_warmup_tokens()
        return max(1, min(1_000_000, after_warmup // 4))

    def _resample_spacing(self) -> int:
        """Tokens between resampling points."""
        if self.resample.every_tokens is not None:
            return self.resample.every_tokens
        span = int(self.resample.stop_fraction * self.total_tokens) - self.sparsity_warmup_tokens()
        return max(0, span // (self.resample.count + 1))

    def resample_points(self) -> list[int]:
        """Token counts at which dead features are resampled (a step resamples when it reaches
        one), all before stop_fraction of training. Bricken et al. resampled at 4 points, each
        judging features dead over the stretch since the previous one."""
        if not self.resample_enabled():
            return []
        stop = self.resample.stop_fraction * self.total_tokens
        spacing = self._resample_spacing()
        if spacing < 1:
            return []
        if self.resample.every_tokens is not None:
            return list(range(spacing, math.ceil(stop), spacing))
        start = self.sparsity_warmup_tokens()
        return [start + i * spacing for i in range(1, self.resample.count + 1)]

    def resample_window_tokens(self) -> int:
        return self.resample.window_tokens or max(1, self._resample_spacing())


RUN_LEVEL_FIELDS = (
    "total_tokens",
    "batch_size",
    "out_dir",
    "device",
    "autocast",
    "compile",
    "checkpoint_every_steps",
    "logging",
    "eval",
    "kl_finetune",
)
"""Fields every member of a sweep must share: they describe the one pass over the data."""
