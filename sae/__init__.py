"""Sparse-autoencoder feature dictionaries: the module, its file format and loaders.

from sae import Dictionary
d = Dictionary.load("path/to/dictionary")      # or a hub repo id, or a SAELens/sparsify dir
f = d.encode(x)                                # [batch, d_sae]
x_hat = d.decode(f)                            # [batch, d_in]
"""

from sae.base import (
    ARCHITECTURES,
    Dictionary,
    DictionaryConfig,
    EncoderOutput,
    ForwardOutput,
    build,
    register,
)
from sae.errors import DictionaryFormatError, UserError

__all__ = [
    "ARCHITECTURES",
    "Dictionary",
    "DictionaryConfig",
    "DictionaryFormatError",
    "EncoderOutput",
    "ForwardOutput",
    "UserError",
    "build",
    "register",
]
