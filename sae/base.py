"""The dictionary module: the shared encode/decode form of every architecture.

Every architecture computes pre-activations the same way and differs only in its
activation function (relu, topk, jumprelu, ...):

    pre = W_enc^T (x - b_dec) + b_enc          (b_dec subtracted only if apply_b_dec_to_input)
    f   = act(pre),   x_hat = f W_dec + b_dec  (+ x W_skip for a transcoder with a skip)

A *transcoder* is the same module whose output is another activation than its input: it reads
`hook_name` (d_in, e.g. the MLP's normalised input) and reconstructs `hook_name_out` (d_out,
e.g. the MLP's output), so W_dec is [d_sae, d_out] and b_dec [d_out] (Dunefsky, Chlenski &
Nanda 2024, "Transcoders find interpretable LLM feature circuits"); a skip transcoder adds a
linear path W_skip [d_in, d_out] (Paulo, Shabalin & Belrose 2025). Its input is never shifted
by b_dec, which lives in the output space.

An architecture is one small file that subclasses `Dictionary`, overrides `activation`
(and, where it has extra parameters, `extra_parameters`), and registers itself by name with
`@register("name")`. Where its codes are sparse it also overrides `active_codes`, and `forward`
then backpropagates through the active codes only (sae/sparse_grad.py); `dense_forward` is the
plain reference. Training objectives live in `training/`, never here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from sae.registry import register_class
from sae.sparse_grad import ActiveCodes, sparse_forward

ARCHITECTURES: dict[str, type[Dictionary]] = {}


def register(name: str) -> Callable[[type[Dictionary]], type[Dictionary]]:
    """Class decorator: make an architecture loadable by `name` in cfg.json."""
    return register_class(ARCHITECTURES, name, kind="architecture", attribute="architecture")


@dataclass
class DictionaryConfig:
    """What `cfg.json` holds: enough to rebuild the module and to know where it belongs."""

    architecture: str
    """Registered architecture name (relu, topk, jumprelu, ...)."""
    d_in: int
    """Width of the hooked activation."""
    d_sae: int
    """Number of dictionary features."""
    dtype: str = "float32"
    """Dtype of the saved weights (float32, bfloat16, float16)."""
    hook_name: str | None = None
    """TransformerLens hook the dictionary reads, e.g. blocks.0.mlp.hook_post."""
    model_name: str | None = None
    """Language model the activations came from (hub name, path or bundled short name)."""
    k: int | None = None
    """Active features per token, for topk."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from x before encoding (Anthropic/SAELens/sparsify yes; Gemma Scope no)."""
    normalization: dict[str, Any] = field(default_factory=dict)
    """Input scaling used in training, recorded for provenance; already folded into weights."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Training run facts: tokens seen, l1_coefficient, dataset, git commit, source format."""
    d_out: int | None = None
    """Width of the activation a transcoder writes (None: a sparse autoencoder, d_out = d_in)."""
    hook_name_out: str | None = None
    """Hook a transcoder reconstructs, e.g. blocks.0.hook_mlp_out (None: hook_name itself)."""
    skip: bool = False
    """A transcoder with a linear skip connection W_skip [d_in, d_out]."""

    @property
    def is_transcoder(self) -> bool:
        """Its output is another activation than its input (d_out set)."""
        return self.d_out is not None

    @property
    def output_width(self) -> int:
        """Width of the reconstruction: d_out for a transcoder, else d_in."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def output_hook(self) -> str | None:
        """Hook the reconstruction belongs to: hook_name_out for a transcoder, else hook_name."""
        return self.hook_name_out if self.is_transcoder else self.hook_name

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class EncoderOutput(NamedTuple):
    """Sparse view of the codes: the active features of each row, largest first for topk."""

    top_acts: Float[Tensor, "B K"]
    top_indices: Int[Tensor, "B K"]


class ForwardOutput(NamedTuple):
    """Everything one forward pass computes that training and analysis need."""

    x_hat: Float[Tensor, "B D"]
    """Reconstruction of the input (of the target activation, [B, d_out], for a transcoder)."""
    feature_acts: Float[Tensor, "B F"]
    """Dense feature activations f (zeros where inactive)."""
    pre_acts: Float[Tensor, "B F"]
    """Pre-activations W_enc^T (x - b_dec) + b_enc, before the activation function. Detached
    when the forward took the sparse path: differentiate through `sae.sparse_grad.gather_pre_acts`."""
    active: ActiveCodes | None = None
    """The codes that may be nonzero, when the forward took the sparse path (None: dense)."""


class Dictionary(nn.Module):
    """Sparse autoencoder: x -> f (sparse, d_sae) -> x_hat (d_in); a transcoder: -> y_hat
    (d_out)."""

    architecture: ClassVar[str] = ""
    needs_k: ClassVar[bool] = False
    """The architecture keeps a fixed number `cfg.k` of features per row (topk, batchtopk)."""
    sparse_grad: bool = True
    """`forward` backpropagates through the active codes only, when the architecture has
    `active_codes` and they are sparse enough (exact; False: always the dense reference)."""

    def __init__(self, cfg: DictionaryConfig) -> None:
        if self.needs_k and (cfg.k is None or not 1 <= cfg.k <= cfg.d_sae):
            raise ValueError(
                f"{self.architecture} needs 1 <= k <= d_sae={cfg.d_sae}, got k={cfg.k}"
            )
        if cfg.is_transcoder and cfg.apply_b_dec_to_input:
            raise ValueError("a transcoder's b_dec is in its output space: apply_b_dec_to_input "
                             "must be false")  # fmt: skip
        if cfg.skip and not cfg.is_transcoder:
            raise ValueError("a skip connection needs a transcoder (d_out set)")
        super().__init__()
        self.cfg = cfg
        d_in, d_sae, d_out = cfg.d_in, cfg.d_sae, cfg.output_width
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae))
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(d_in, d_out))
        for name, shape in self.extra_parameters().items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape)))

    # -- what an architecture file overrides -------------------------------------------------
    def extra_parameters(self) -> dict[str, tuple[int, ...]]:
        """Parameters beyond W_enc, b_enc, W_dec, b_dec (e.g. jumprelu's threshold)."""
        return {}

    def activation(self, pre_acts: Float[Tensor, "B F"]) -> Float[Tensor, "B F"]:
        """The architecture's nonlinearity: pre-activations to dense codes."""
        raise NotImplementedError

    def active_codes(self, pre_acts: Float[Tensor, "B F"]) -> ActiveCodes | None:
        """The codes `activation(pre_acts)` may make nonzero, or None for the dense path.

        Every other code must be 0 with no gradient to its pre-activation; the active ones are
        relu(pre_acts) at these pairs (a pair whose pre-activation is <= 0 is allowed)."""
        return None

    # -- the shared form ----------------------------------------------------------------------
    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of the reconstruction (d_in for a sparse autoencoder)."""
        return self.cfg.output_width

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_enc.dtype

    def pre_activations(self, x: Float[Tensor, "B D"]) -> Float[Tensor, "B F"]:
        bias: Tensor = self.b_enc
        if self.cfg.apply_b_dec_to_input:
            # (x - b_dec) W_enc written as x W_enc - b_dec W_enc: the same value, but b_dec's
            # gradient does not need the [B, D] input gradient, which would be a sixth big
            # matmul in a training step; folded into the bias, one addmm does the rest.
            bias = bias - self.b_dec @ self.W_enc
        pre = torch.addmm(bias, x.reshape(-1, self.d_in), self.W_enc)
        return pre.reshape(*x.shape[:-1], self.d_sae)

    def encode(self, x: Float[Tensor, "B D"]) -> Float[Tensor, "B F"]:
        """Dense feature activations f for inputs x (any leading dims)."""
        return self.activation(self.pre_activations(x))

    def encode_sparse(self, x: Float[Tensor, "B D"], k: int | None = None) -> EncoderOutput:
        """The k largest activations of each row (k defaults to cfg.k, else the max L0 seen)."""
        f = self.encode(x)
        if k is None:
            k = self.cfg.k or max(int((f != 0).sum(-1).max().item()), 1)
        acts, idx = f.topk(k, dim=-1, sorted=True)
        return EncoderOutput(acts, idx)

    def decode(self, f: Float[Tensor, "B F"]) -> Float[Tensor, "B D"]:
        """Dense reference decode: x_hat = f W_dec + b_dec (a skip transcoder's skip term
        needs the input: `forward` adds it, see `skip_output`)."""
        return f @ self.W_dec + self.b_dec

    def skip_output(self, x: Float[Tensor, "B D"]) -> Float[Tensor, "B O"] | None:
        """x W_skip, the skip transcoder's linear path (None without one)."""
        if not self.cfg.skip:
            return None
        W_skip: Tensor = self.W_skip
        out = torch.mm(x.reshape(-1, self.d_in).to(W_skip.dtype), W_skip)
        return out.reshape(*x.shape[:-1], self.d_out)

    def with_skip(self, x: Float[Tensor, "B D"], out: ForwardOutput) -> ForwardOutput:
        """`out` with the skip path added to its reconstruction (unchanged without one)."""
        skip = self.skip_output(x)
        return out if skip is None else out._replace(x_hat=out.x_hat + skip.to(out.x_hat.dtype))

    def decode_sparse(
        self, top_acts: Float[Tensor, "B K"], top_indices: Int[Tensor, "B K"]
    ) -> Float[Tensor, "B D"]:
        """Decode touching only the active rows of W_dec (same values and gradients as decode).

        `embedding_bag` gathers K decoder rows per input instead of multiplying by a mostly-zero
        [B, F] matrix: the cost is O(B K D) rather than O(B F D), as in sparsify's decoder.
        """
        lead = top_acts.shape[:-1]
        acts = top_acts.reshape(-1, top_acts.shape[-1])
        idx = top_indices.reshape(-1, top_indices.shape[-1])
        out = F.embedding_bag(
            idx, self.W_dec, per_sample_weights=acts.to(self.W_dec.dtype), mode="sum"
        )
        return (out + self.b_dec).reshape(*lead, self.d_out)

    def forward(self, x: Float[Tensor, "B D"]) -> ForwardOutput:
        """Reconstruction, codes and pre-activations; the sparse path when `sparse_grad`."""
        pre = self.pre_activations(x)
        if self.sparse_grad and x.dim() == 2:
            out = self._sparse_output(x, pre.detach())
            if out is not None:
                return self.with_skip(x, out)
        return self.with_skip(x, self.dense_output(pre))

    @torch.compiler.disable  # data-dependent shapes: compiled graphs stop around this step
    def _sparse_output(self, x: Tensor, pre: Tensor) -> ForwardOutput | None:
        codes = self.active_codes(pre)
        return None if codes is None else sparse_forward(self, x, pre, codes)

    def dense_forward(self, x: Float[Tensor, "B D"]) -> ForwardOutput:
        """The plain reference: dense codes, dense decode, dense gradients."""
        return self.with_skip(x, self.dense_output(self.pre_activations(x)))

    def dense_output(self, pre: Float[Tensor, "B F"]) -> ForwardOutput:
        """ForwardOutput from pre-activations through `activation` and `decode`."""
        f = self.activation(pre)
        return ForwardOutput(x_hat=self.decode(f), feature_acts=f, pre_acts=pre)

    def feature_direction(self, feature_id: int) -> Float[Tensor, " D"]:
        """Unit vector the feature writes into activation space (its decoder row, normalised)."""
        if not 0 <= feature_id < self.d_sae:
            raise IndexError(f"feature_id {feature_id} out of range [0, {self.d_sae})")
        return F.normalize(self.W_dec[feature_id], dim=0)

    @torch.no_grad()
    def fold_input_scale(self, scale: float, output_scale: float | None = None) -> None:
        """Make a dictionary trained on `scale * x` act on raw x, so users never rescale inputs.

        pre = W_enc^T (s x - b_dec) + b_enc = (s W_enc)^T (x - b_dec / s) + b_enc, and the
        reconstruction of x is (f W_dec + b_dec) / s. Codes f are unchanged. A transcoder
        trained to map s x to t y (`output_scale` t) writes y = (f W_dec + b_dec) / t and its
        skip path becomes x (s / t) W_skip.
        """
        t = scale if output_scale is None else output_scale
        self.W_enc.mul_(scale)
        self.W_dec.div_(t)
        self.b_dec.div_(t)
        if self.cfg.skip:
            self.get_parameter("W_skip").mul_(scale / t)
        folded: dict[str, float] = {"folded_input_scale": scale}
        if output_scale is not None:
            folded["folded_output_scale"] = output_scale
        self.cfg.normalization = {**self.cfg.normalization, **folded}

    # -- I/O lives in sae/io.py; these are the conveniences users call -----------------------
    def save(self, path: Any) -> None:
        from sae.io import save_dictionary

        save_dictionary(self, path)

    @classmethod
    def load(
        cls, path_or_repo: Any, device: str | torch.device = "cpu", **kwargs: Any
    ) -> Dictionary:
        from sae.io import load_dictionary

        return load_dictionary(path_or_repo, device=device, **kwargs)


def architecture_class(name: str) -> type[Dictionary]:
    """The class registered as `name` (built-in architectures included); ValueError if none."""
    from sae import architectures  # noqa: F401  (registers the built-in architectures)

    try:
        return ARCHITECTURES[name]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ValueError(f"unknown architecture {name!r}; known: {known}") from None


def build(cfg: DictionaryConfig) -> Dictionary:
    """Instantiate the registered architecture named in cfg (weights zero-filled)."""
    return architecture_class(cfg.architecture)(cfg)
