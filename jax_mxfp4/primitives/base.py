"""One JAX primitive = one class (TransformerEngine's pattern, keyword params).

A subclass of ``FfiPrimitive`` declares its name, its custom-call target, the
platforms it lowers to, and four rules next to each other: ``abstract_eval``
(exact output shapes/dtypes; validates and raises ``ValueError`` at trace
time), ``ffi_attributes`` (static params -> FFI attributes), ``batch`` (vmap)
and optionally ``fallback`` (a pure-jnp implementation lowered on platforms
with no custom call). ``register_primitive`` turns the class into a
``jax.extend.core.Primitive`` and registers every rule.

Static params are passed to ``bind`` by keyword and must be hashable (ints,
enums); they are never positional indices.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

from jax_mxfp4 import _native

__all__ = ["FfiPrimitive", "register_primitive"]


class FfiPrimitive(abc.ABC):
    """Base class of the package's custom-call primitives."""

    #: Name of the JAX primitive (shows in jaxprs).
    name: ClassVar[str]
    #: XLA FFI target name (registered by the extension, see ``_native``).
    target: ClassVar[str]
    #: Lowering platforms with a native handler ("cpu", "cuda").
    platforms: ClassVar[tuple[str, ...]]
    multiple_results: ClassVar[bool] = False
    #: Set by ``register_primitive``.
    primitive: ClassVar[Primitive]

    @classmethod
    @abc.abstractmethod
    def abstract_eval(cls, *avals, **params):
        """Output avals (``jax.core.ShapedArray``) for input avals."""

    @classmethod
    def ffi_attributes(cls, **params) -> dict[str, Any]:
        """FFI attributes for the static params (numpy scalars give typed attributes)."""
        return dict(params)

    @classmethod
    @abc.abstractmethod
    def batch(cls, args, dims, **params):
        """vmap rule: returns ``(outputs, output batch dims)``."""

    # Platforms without a handler lower this, when a subclass defines it.
    fallback: ClassVar[Any] = None

    @classmethod
    def bind(cls, *args, **params):
        return cls.primitive.bind(*args, **params)

    @classmethod
    def _lowering(cls, platform: str):
        def rule(ctx, *args, **params):
            _native.require_target(cls.target, platform)
            return jax.ffi.ffi_lowering(cls.target)(ctx, *args, **cls.ffi_attributes(**params))

        return rule


def register_primitive(cls: type[FfiPrimitive]) -> type[FfiPrimitive]:
    """Class decorator: creates ``cls.primitive`` and registers all rules."""
    prim = Primitive(cls.name)
    prim.multiple_results = cls.multiple_results
    prim.def_abstract_eval(cls.abstract_eval)

    def impl(*args, **params):
        return jax.jit(lambda *a: prim.bind(*a, **params))(*args)

    prim.def_impl(impl)
    for platform in cls.platforms:
        mlir.register_lowering(prim, cls._lowering(platform), platform=platform)
    if cls.fallback is not None:
        # Any other platform (e.g. TPU, ROCm) lowers the pure-jnp definition.
        mlir.register_lowering(
            prim, mlir.lower_fun(cls.fallback, multiple_results=cls.multiple_results)
        )
    batching.primitive_batchers[prim] = cls.batch
    cls.primitive = prim
    return cls
