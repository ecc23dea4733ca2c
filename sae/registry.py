"""Name -> class registries of the plug-in files: architectures (sae/architectures/, by
`@register` in sae/base.py) and training objectives (training/objectives/, by
`@register_objective`). One helper, so both refuse a duplicate name and stamp the class alike."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

C = TypeVar("C", bound=type)


def register_class(
    registry: dict[str, C], name: str, kind: str, attribute: str
) -> Callable[[C], C]:
    """A class decorator that stores the class in `registry` under `name` and sets its
    `attribute` to `name`; a name registered twice is a ValueError naming the `kind`."""

    def deco(cls: C) -> C:
        if name in registry:
            raise ValueError(f"{kind} {name!r} registered twice")
        setattr(cls, attribute, name)
        registry[name] = cls
        return cls

    return deco
