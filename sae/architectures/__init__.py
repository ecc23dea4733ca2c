"""Built-in architectures; importing this package registers them all."""

from sae.architectures import batchtopk, jumprelu, relu, topk  # noqa: F401
