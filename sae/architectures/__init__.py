"""Built-in architectures; importing this package registers them all."""

from sae.architectures import relu  # noqa: F401
