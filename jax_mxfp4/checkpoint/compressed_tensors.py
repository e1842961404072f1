"""compressed-tensors MXFP4 checkpoints: the former single-module home of ``jax_mxfp4.checkpoint``.

The code now lives in the package's modules (see ``jax_mxfp4.checkpoint``);
this module keeps ``from jax_mxfp4.checkpoint.compressed_tensors import ...``
working for the public names.
"""

from jax_mxfp4.checkpoint import *  # noqa: F401,F403
from jax_mxfp4.checkpoint import __all__  # noqa: F401
