"""The contract between activations/ and training/: a source of activation batches.

`Trainer.fit` (training/trainer.py) takes a `BatchSource`: anything that iterates
`Float[Tensor, "B D"]` batches of one hook's activations (a list of tensors will do). A source
that is also a `ResumableSource` (`CachedActivations`, `StreamedActivations`) has its position
saved in every checkpoint and restored on resume, so a resumed run sees exactly the batches an
uninterrupted one would have; any other source is replayed and the consumed batches skipped.

The protocols live here, beside the sources that implement them, and import nothing but torch:
the trainer depends on this module, never on a language model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

from jaxtyping import Float
from torch import Tensor


class BatchSource(Protocol):
    """Iterates activation batches [B, D]; D (d_in) is the same for every batch."""

    def __iter__(self) -> Iterator[Float[Tensor, "B D"]]: ...


@runtime_checkable
class ResumableSource(BatchSource, Protocol):
    """A `BatchSource` whose position can be saved and restored.

    `state_dict()` after a batch says where the next one starts; `load_state_dict(state)` makes
    the next iteration continue from there with exactly the same batches.
    """

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
