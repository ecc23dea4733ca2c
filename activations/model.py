"""The one model loader: a hub name, a local Hugging Face directory, or the bundled model.

Every language model goes through `TransformerBridge.boot_transformers` (TransformerLens 4.x)
followed by `enable_compatibility_mode()`, so hook names are the classic TransformerLens ones
(`blocks.0.mlp.hook_post`, `blocks.0.hook_resid_post`, ...) whatever the source. The bundled
model (trained by `sae train-lm`, lm/) is an ordinary Hugging Face GPT-2 directory shipped in
`activations/bundled/`, so it takes exactly the same path as `gpt2` from the hub.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from jaxtyping import Bool

from activations.text import _first_line
from sae.errors import UserError

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

logger = logging.getLogger(__name__)

BUNDLED_MODEL = "stdlib-1l-512"
"""Short name of the bundled model: 1 layer, d_model 128, 512 MLP neurons, trained on the
Python standard library (`activations.corpus`). "bundled" is accepted as an alias."""

BUNDLED_ALIASES = (BUNDLED_MODEL, "bundled")

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
"""Where the bundled model's Hugging Face files live inside the installed package."""

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _offline_message(name: str) -> str:
    return (
        f"model {name!r} is not available offline: the hub is unreachable and it is not in "
        f"the local cache; pass a local directory or the bundled model {BUNDLED_MODEL!r}"
    )


def resolve_model_path(name: str) -> str:
    """Map a model name to what `boot_transformers` accepts.

    The bundled short name (or "bundled") -> the bundled directory; an existing local
    directory -> itself; anything else is returned unchanged as a hub id.
    """
    if name in BUNDLED_ALIASES:
        missing = [f for f in _REQUIRED_FILES if not (BUNDLED_DIR / f).is_file()]
        if missing:
            raise UserError(
                f"the bundled model {BUNDLED_MODEL!r} is missing {', '.join(missing)} in "
                f"{BUNDLED_DIR}; retrain it with `sae train-lm --out {BUNDLED_DIR}`"
            )
        return str(BUNDLED_DIR)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{path} is not a Hugging Face model directory: no config.json")
        return str(path)
    if path.exists():
        raise UserError(f"{path} is a file, not a Hugging Face model directory")
    return name


def _check_hub_cache(name: str) -> None:
    """With HF_HUB_OFFLINE set, fail fast and clearly if `name` is not in the local cache."""
    if not _hub_offline():
        return
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # a malformed repo id is also "not in the cache"
        cached = None
    if not isinstance(cached, str):
        raise UserError(_offline_message(name))


def load_model(
    name: str = BUNDLED_MODEL,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> TransformerBridge:
    """Load a causal LM through TransformerLens with classic hook names.

    `bridge.tokenizer` is the Hugging Face tokenizer and `bridge.cfg` has d_model, d_mlp,
    n_layers, n_ctx, d_vocab. A hub name that cannot be fetched raises a one-line UserError.
    """
    path = resolve_model_path(name)
    is_local = Path(path).is_dir()
    if not is_local:
        _check_hub_cache(name)  # before the slow TransformerLens import: fail fast offline

    from transformer_lens.model_bridge import TransformerBridge

    try:
        bridge = TransformerBridge.boot_transformers(path, device=device, dtype=dtype)
    except OSError as e:
        if is_local:
            raise UserError(f"cannot load the model in {path}: {_first_line(e)}") from e
        if _is_connection_problem(e):
            raise UserError(_offline_message(name)) from e
        raise UserError(f"cannot load model {name!r} from the hub: {_first_line(e)}") from e
    bridge.enable_compatibility_mode(disable_warnings=True)
    logger.info(
        "loaded %s: %d layer(s), d_model %d, d_mlp %s, n_ctx %d, vocab %d",
        name,
        bridge.cfg.n_layers,
        bridge.cfg.d_model,
        bridge.cfg.d_mlp,
        bridge.cfg.n_ctx,
        bridge.cfg.d_vocab,
    )
    return bridge


def _is_connection_problem(e: BaseException) -> bool:
    """True if the error chain says the hub could not be reached (vs. e.g. a missing repo)."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, (LocalEntryNotFoundError, ConnectionError, TimeoutError)):
            return True
        text = str(seen)
        if "couldn't connect" in text or "outgoing traffic has been disabled" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class HealedPrompt(NamedTuple):
    """A prompt prepared for generation with token healing (see `heal_prompt`)."""

    ids: list[int]
    """BOS then the prompt's tokens without its last one."""
    first_token_allowed: Bool[torch.Tensor, " V"] | None
    """Mask over the vocabulary for the first generated token (None: no constraint)."""


def heal_prompt(tokenizer: Any, prompt: str) -> HealedPrompt:
    """Token healing (as in Microsoft's guidance library) for byte-level BPE prompts.

    GPT-2-style pre-tokenization attaches a space to the *following* word, so a prompt such
    as "def " ends in a lone space token that training text rarely shows before a name, and
    greedy decoding continues it badly. Drop the prompt's last token and let the first
    generated token be any token whose text extends it (" name", " (" ...).
    """
    ids = [tokenizer.bos_token_id, *tokenizer.encode(prompt, add_special_tokens=False)]
    if len(ids) == 1:
        return HealedPrompt(ids, None)
    tail = str(tokenizer.decode(ids[-1:], clean_up_tokenization_spaces=False))
    pieces = tokenizer.batch_decode(
        [[i] for i in range(len(tokenizer))], clean_up_tokenization_spaces=False
    )
    special = set(tokenizer.all_special_ids)
    allowed = torch.tensor([p.startswith(tail) and i not in special for i, p in enumerate(pieces)])
    return HealedPrompt(ids[:-1], allowed)
