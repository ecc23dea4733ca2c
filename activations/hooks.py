"""Hook names and every way the project hooks a language model (the only place that does).

- `ActivationCapture`: several hooks read in one forward pass that stops early;
- `hook_activations`: one hook's activations for a text or a batch (the server's requests);
- `run_with_edits`: the logits with hook activations replaced (loss recovered, steering).

Names are the classic TransformerLens ones that `TransformerBridge` serves in compatibility mode
(`blocks.0.mlp.hook_post`, `blocks.3.hook_resid_post`, `hook_embed`, ...). Validation happens
before any work and lists what the model offers.

Stopping early: TransformerBridge's `stop_at_layer=L` stops at the *input* of block L, so the
last block still runs to the unembedding (for a 1-layer model that is the whole model, and the
unembedding is often its most expensive matmul). Instead, the capture hook of the last
requested hook to fire raises `_StopForward`, which ends the pass right after the last activation
we need, whatever its layer or position inside the block.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from types import TracebackType
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from sae.errors import UserError

_LAYER = re.compile(r"^blocks\.(\d+)\.")

Edit = Callable[[Tensor], Tensor]
"""A hook edit: a hook's activation in, the activation the model continues with out."""


_LOCKS_LOCK = threading.Lock()


def model_lock(model: Any) -> threading.RLock:
    """The model's hook lock: hooks live on the model itself, so a thread that hooked it while
    another runs it (a streaming producer, an evaluation) would see, or remove, the other's
    hooks. Every function here holds it while its hooks are attached."""
    with _LOCKS_LOCK:
        lock = getattr(model, "_sae_hook_lock", None)
        if lock is None:
            lock = threading.RLock()
            object.__setattr__(model, "_sae_hook_lock", lock)
        return lock


class _StopForward(Exception):
    """Raised by the last capture hook: everything after it is wasted work."""


def hook_layer(name: str) -> int | None:
    """The block index of a hook name (`blocks.3.mlp.hook_post` -> 3), None outside blocks."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def valid_hook_names(model: Any) -> list[str]:
    """Hook names the model can serve now (gated ones such as attn.hook_result left out)."""
    gated = getattr(model, "_gated_hook_reason", lambda name: None)
    return [name for name in model.hook_dict if gated(name) is None]


def _compact(names: Iterable[str]) -> str:
    """`blocks.0.x, blocks.1.x, ...` -> `blocks.{0..N}.x`: a 48-layer model's list stays short."""
    per_suffix: dict[str, list[int]] = {}
    for name in names:
        layer = hook_layer(name)
        key = name if layer is None else _LAYER.sub("blocks.{}.", name)
        per_suffix.setdefault(key, []).append(-1 if layer is None else layer)
    parts = []
    for key, layers in per_suffix.items():
        if layers == [-1]:
            parts.append(key)
        else:
            lo, hi = min(layers), max(layers)
            parts.append(key.replace("{}", str(lo) if lo == hi else f"{{{lo}..{hi}}}"))
    return ", ".join(parts)


def check_hook_names(model: Any, hook_names: Iterable[str]) -> list[str]:
    """The requested names, deduplicated in order; a UserError listing valid names otherwise."""
    names = list(dict.fromkeys(hook_names))
    if not names:
        raise UserError("no hook name given; e.g. blocks.0.mlp.hook_post")
    valid = valid_hook_names(model)
    known = set(valid)
    for name in names:
        if name in known:
            continue
        reason = getattr(model, "_gated_hook_reason", lambda n: None)(name)
        if name in model.hook_dict and reason is not None:
            raise UserError(f"hook {name!r} needs the model option {reason}=True")
        layer, n_layers = hook_layer(name), getattr(getattr(model, "cfg", None), "n_layers", None)
        if layer is not None and isinstance(n_layers, int) and layer >= n_layers:
            raise UserError(
                f"unknown hook {name!r}: past the model's last layer (it has {n_layers} "
                f"layer(s), blocks.0 to blocks.{n_layers - 1}); valid hook names: {_compact(valid)}"
            )
        raise UserError(f"unknown hook {name!r}; valid hook names: {_compact(valid)}")
    return names


class ActivationCapture:
    """While open, `capture(tokens)` returns {hook_name: Tensor[S, T, D]} for every requested
    hook from ONE forward pass that stops after the last of them fires.

    Hooks with more than one trailing dimension (e.g. `attn.hook_z`: heads x d_head) are
    flattened to [S, T, heads * d_head], as SAELens does for hook_z dictionaries.
    """

    def __init__(self, model: Any, hook_names: Iterable[str]) -> None:
        self.model = model
        self.hook_names = check_hook_names(model, hook_names)
        self._store: dict[str, Tensor] = {}
        self._context: Any = None
        self._active = False

    def _hook_fn(self, name: str):
        def fn(tensor: Tensor, *, hook: Any) -> Tensor:
            if not self._active:  # another capture (or plain forward) is using the model
                return tensor
            if isinstance(tensor, tuple):  # some bridged modules hand their output tuple
                tensor = tensor[0]
            self._store[name] = tensor.detach()
            if len(self._store) == len(self.hook_names):
                raise _StopForward
            return tensor

        return fn

    def __enter__(self) -> ActivationCapture:
        self._lock = model_lock(self.model)
        self._lock.acquire()
        try:
            self._context = self.model.hooks(
                fwd_hooks=[(name, self._hook_fn(name)) for name in self.hook_names]
            )
            self._context.__enter__()
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._context.__exit__(exc_type, exc, tb)
        finally:
            self._context = None
            self._lock.release()

    @torch.no_grad()
    def __call__(self, tokens: Int[Tensor, "S T"]) -> dict[str, Float[Tensor, "S T D"]]:
        if self._context is None:
            raise RuntimeError("use ActivationCapture inside a `with` block")
        self._store = {}
        self._active = True
        try:
            with contextlib.suppress(_StopForward):
                self.model(tokens, return_type=None)
        finally:
            self._active = False
        missing = [n for n in self.hook_names if n not in self._store]
        if missing:
            raise UserError(f"hook(s) {', '.join(missing)} did not fire in a forward pass")
        out = {}
        S, T = tokens.shape
        for name in self.hook_names:
            act = self._store[name]
            if act.dim() < 3 or tuple(act.shape[:2]) != (S, T):
                raise UserError(
                    f"hook {name!r} gives shape {tuple(act.shape)}, not [batch, position, ...]; "
                    "only per-token activations can be cached"
                )
            out[name] = act.reshape(S, T, -1)
        self._store = {}
        return out


def hook_widths(model: Any, hook_names: Iterable[str]) -> dict[str, int]:
    """d_in of each hook, measured by a forward pass over two BOS tokens."""
    names = check_hook_names(model, hook_names)
    bos = model.tokenizer.bos_token_id
    bos = model.tokenizer.eos_token_id if bos is None else bos
    device = next(model.parameters()).device
    tokens = torch.full((1, 2), int(bos or 0), dtype=torch.long, device=device)
    with ActivationCapture(model, names) as capture:
        acts = capture(tokens)
    return {name: int(a.shape[-1]) for name, a in acts.items()}


def firing_order(model: Any, hook_names: Iterable[str]) -> list[str]:
    """The hooks in the order they fire in a forward pass (over two BOS tokens)."""
    names = check_hook_names(model, hook_names)
    order: list[str] = []

    def note(name: str) -> Callable[..., Any]:
        def fn(tensor: Any, *, hook: Any) -> Any:
            if name not in order:
                order.append(name)
            return tensor

        return fn

    bos = model.tokenizer.bos_token_id
    bos = model.tokenizer.eos_token_id if bos is None else bos
    device = next(model.parameters()).device
    tokens = torch.full((1, 2), int(bos or 0), dtype=torch.long, device=device)
    with torch.no_grad(), model_lock(model), model.hooks(fwd_hooks=[(n, note(n)) for n in names]):
        model(tokens, return_type=None)
    return order


def check_transcoder_hooks(model: Any, input_hook: str, target_hook: str) -> None:
    """A UserError unless `target_hook` comes after `input_hook` in the forward pass (measured
    on `model`; with no model, by their block numbers): a transcoder maps an activation to one
    computed from it, never to one computed before it."""
    if input_hook == target_hook:
        raise UserError(f"a transcoder's target {target_hook} is its input hook; a transcoder "
                        "reconstructs another hook (e.g. blocks.0.hook_mlp_out)")  # fmt: skip
    if model is not None:
        order = firing_order(model, [input_hook, target_hook])
        before = len(order) == 2 and order.index(target_hook) < order.index(input_hook)
    else:
        a, b = hook_layer(input_hook), hook_layer(target_hook)
        before = a is not None and b is not None and b < a
    if before:
        raise UserError(f"transcoder target {target_hook} comes before its input {input_hook} "
                        "in the forward pass; the target must be computed from the input, e.g. "
                        "blocks.L.ln2.hook_normalized -> blocks.L.hook_mlp_out")  # fmt: skip


def check_hook_width(model: Any, hook_name: str, d_in: int) -> None:
    """UserError before any work if the model has no such hook or its width is not `d_in`
    (a dictionary paired with the wrong model)."""
    width = hook_widths(model, [hook_name])[hook_name]
    if width != d_in:
        raise UserError(
            f"dictionary reads {hook_name} with d_in {d_in}, but the model's "
            f"{hook_name} has width {width}: wrong model or dictionary"
        )


@torch.no_grad()
def hook_activations(
    model: Any, token_ids: Int[Tensor, "*B T"], hook_name: str
) -> Float[Tensor, "*B T D"]:
    """The activation at `hook_name` for every token of one text [T] or a batch [B, T], on the
    model's device (one forward pass that stops there)."""
    device = next(model.parameters()).device
    batch = token_ids if token_ids.dim() == 2 else token_ids[None]
    with ActivationCapture(model, [hook_name]) as capture:
        acts = capture(batch.to(device))[hook_name]
    return acts if token_ids.dim() == 2 else acts[0]


def _edit_hook(edit: Edit) -> Callable[..., Any]:
    def fn(tensor: Any, *, hook: Any) -> Any:
        if isinstance(tensor, tuple):  # some bridged modules hand their output tuple
            return (edit(tensor[0]), *tensor[1:])
        return edit(tensor)

    return fn


@torch.no_grad()
def run_with_edits(
    model: Any, tokens: Int[Tensor, "B T"], edits: Mapping[str, Edit]
) -> Float[Tensor, "B T V"]:
    """The model's logits on `tokens` with the activation `x` at each hook `name` of `edits`
    replaced by `edits[name](x)` (no edits: the plain forward pass)."""
    fwd_hooks = [(name, _edit_hook(edit)) for name, edit in edits.items()]
    with model_lock(model), model.hooks(fwd_hooks=fwd_hooks):
        return model(tokens, return_type="logits")
