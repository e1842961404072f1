"""One JAX primitive = one class (TransformerEngine's pattern, keyword params).

A subclass of ``FfiPrimitive`` declares its name, its custom-call target, the
platforms it lowers to, and its rules next to each other: ``abstract_eval``
(exact output shapes/dtypes; validates and raises ``ValueError`` at trace
time), ``ffi_attributes`` (static params -> FFI attributes), ``batch`` (vmap),
optionally ``fallback`` (a pure-jnp implementation lowered on platforms with
no custom call), and optionally the two sharding rules below.
``register_primitive`` turns the class into JAX primitives and registers
every rule.

Static params are passed to ``bind`` by keyword and must be hashable (ints,
enums); they are never positional indices.

Sharding (DESIGN.md section 8)
------------------------------
A class that overrides ``partition`` is partitioned with
``jax.experimental.custom_partitioning``, like TransformerEngine's primitives:

* the *inner* primitive (``cls.inner_primitive``) lowers straight to the FFI
  call and only ever sees one device's shards;
* the *outer* primitive (``cls.primitive``, what ``cls.bind`` binds and what
  jaxprs show) carries abstract eval and the vmap rule, and lowers to a
  ``custom_partitioning`` call around the inner one. On one device, and
  inside ``shard_map`` (all mesh axes manual), that is just the inner call.

The class declares two classmethods:

* ``sharding_rule(mesh, in_shapes, out_shapes, **params)``: the Shardy
  rule, an einsum-like string such as ``"... (k b), n (k h), n k -> ... n"``
  or ``(string, {"reduction_factors": ("k",), "b": 32, "h": 16})``, or an
  ``SdyShardingRule``. Shardy (the default partitioner of jax 0.10 and 0.11)
  uses it to propagate shardings through the op: a factor shared by an
  operand and a result dimension carries sharding across; factors of
  different operands with the same name are split alike; compound factors
  ``(k b)`` express "split in whole blocks of b". A rule only guides
  propagation; ``partition`` has the last word on what runs.
* ``partition(mesh, args, **params) -> Partition``: given the operands'
  global shapes and shardings (``jax.ShapeDtypeStruct`` with a
  ``NamedSharding``), the shardings the op runs with and its per-shard body.
  XLA reshards operands to ``Partition.in_specs``; when that drops a mesh axis
  from an operand dimension (an all-gather or all-to-all), a
  ``ShardingWarning`` says which operand, which axes and why (``notes``).
  ``partition`` only ever sees ``NamedSharding``s: base decodes what XLA
  hands over itself (``sharding.decode``), because Shardy may split a mesh
  axis into sub-axes (e.g. K = 2 blocks over 4 devices), which jax's own
  decoding rejects with an INTERNAL error; such an operand reads as
  replicated (and the warning says so).
  The same function answers GSPMD's ``infer_sharding_from_operands`` (output
  shardings), for the legacy ``jax_use_shardy_partitioner=False`` mode.

A result that must be all-reduced (K split in a GEMM) is reduced inside
``Partition.local`` with ``lax.psum`` over the mesh axes (the axis names are
bound while the body is traced).

Outputs that are only scratch for the kernel (a workspace taken from XLA)
are declared with ``num_workspace_results``: the last that many results of
``abstract_eval`` exist only on the inner primitive; the outer primitive,
and so every user, never sees them (their size may depend on the local
shapes, so they could not be described as a sharded global array).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import warnings
from typing import Any, Callable, ClassVar

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir
from jax.sharding import NamedSharding, PartitionSpec

from jax_mxfp4 import _native
from jax_mxfp4 import sharding as sharding_lib
from jax_mxfp4.sharding import ShardingWarning, describe

__all__ = ["FfiPrimitive", "Partition", "register_primitive"]


@dataclasses.dataclass(frozen=True)
class Partition:
    """How a partitioned primitive runs on local shards.

    Attributes:
      in_specs: one ``PartitionSpec`` per operand: the sharding the op runs
        with (XLA reshards operands to it).
      out_specs: one ``PartitionSpec`` per result of the outer primitive.
      local: the per-shard body ``(*local_operands) -> local result(s)``;
        None binds the inner primitive with the same params. It may use
        collectives over the mesh's axis names (e.g. ``lax.psum``).
      notes: why a requested sharding was not honoured (shown in the warning
        when that costs a gather).
    """

    in_specs: tuple[PartitionSpec, ...]
    out_specs: tuple[PartitionSpec, ...]
    local: Callable | None = None
    notes: tuple[str, ...] = ()


class FfiPrimitive(abc.ABC):
    """Base class of the package's custom-call primitives."""

    #: Name of the JAX primitive (shows in jaxprs).
    name: ClassVar[str]
    #: XLA FFI target name (registered by the extension, see ``_native``).
    target: ClassVar[str]
    #: Lowering platforms with a native handler ("cpu", "cuda").
    platforms: ClassVar[tuple[str, ...]]
    #: Whether the outer primitive (what users bind) has several results.
    multiple_results: ClassVar[bool] = False
    #: Trailing results of ``abstract_eval`` that are kernel scratch, hidden
    #: from users (only partitioned primitives).
    num_workspace_results: ClassVar[int] = 0
    #: Operand names for messages (default "operand i").
    operand_names: ClassVar[tuple[str, ...]] = ()
    #: Set by ``register_primitive``: what ``bind`` binds.
    primitive: ClassVar[Primitive]
    #: Set by ``register_primitive``: the primitive lowered to the FFI call,
    #: run on local shards (the same object as ``primitive`` when the class
    #: has no sharding rules).
    inner_primitive: ClassVar[Primitive]

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

    # -- sharding (optional; see the module docstring) ----------------------

    @classmethod
    def sharding_rule(cls, mesh, in_shapes, out_shapes, **params):
        """Shardy rule: einsum-like string, ``(string, kwargs)`` or ``SdyShardingRule``."""
        raise NotImplementedError(f"{cls.__name__} declares partition() but no sharding_rule().")

    @classmethod
    def partition(cls, mesh, args, **params) -> Partition:
        """Shardings to run with and the per-shard body; see ``Partition``."""
        raise NotImplementedError

    @classmethod
    def is_partitioned(cls) -> bool:
        return cls.partition.__func__ is not FfiPrimitive.partition.__func__

    @classmethod
    def bind(cls, *args, **params):
        return cls.primitive.bind(*args, **params)

    @classmethod
    def _lowering(cls, platform: str):
        def rule(ctx, *args, **params):
            _native.require_target(cls.target, platform)
            return jax.ffi.ffi_lowering(cls.target)(ctx, *args, **cls.ffi_attributes(**params))

        return rule

    @classmethod
    def _operand_name(cls, i: int) -> str:
        return cls.operand_names[i] if i < len(cls.operand_names) else f"operand {i}"


# ---------------------------------------------------------------------------
# custom_partitioning wiring.


@dataclasses.dataclass(frozen=True)
class _Params:
    """Static params as one hashable static argument of the custom_partitioning call."""

    items: tuple[tuple[str, Any], ...]

    @classmethod
    def of(cls, params: dict) -> "_Params":
        return cls(tuple(sorted(params.items())))

    @property
    def kw(self) -> dict:
        return dict(self.items)


def _decode_args(mesh, args):
    """The operands as ShapeDtypeStructs with NamedShardings on ``mesh`` (None where undecodable)."""
    out, dims = [], []
    for arg in args:
        d = sharding_lib.decode(arg.sharding, arg.shape, mesh) if not mesh.empty else None
        dims.append(d)
        spec = sharding_lib.to_spec(d) if d is not None else PartitionSpec()
        named = NamedSharding(mesh, spec) if not mesh.empty else None
        out.append(jax.ShapeDtypeStruct(arg.shape, arg.dtype, sharding=named))
    return tuple(out), dims


def _plan(cls, mesh, args, params: _Params):
    """(plan, decoded operand dims) for operands with any shardings."""
    decoded, dims = _decode_args(mesh, args)
    if mesh.empty:
        # No mesh to reason in: run replicated, which is always correct.
        n_out = _num_outer_results(cls, args, params)
        return Partition(tuple(PartitionSpec() for _ in args), tuple(PartitionSpec() for _ in range(n_out)),
                         notes=("there is no mesh: shard with jax.sharding.NamedSharding (or a `with mesh:` "
                                "context) to run on local shards",)), dims
    plan = cls.partition(mesh, decoded, **params.kw)
    if len(plan.in_specs) != len(args):
        raise ValueError(f"{cls.__name__}.partition returned {len(plan.in_specs)} in_specs for {len(args)} operands.")
    return plan, dims


def _num_outer_results(cls, args, params: _Params) -> int:
    if not cls.multiple_results:
        return 1
    avals = [jax.core.ShapedArray(a.shape, a.dtype) for a in args]
    return len(cls.abstract_eval(*avals, **params.kw)) - cls.num_workspace_results


def _warn_about_gathers(cls, args, dims, plan: Partition) -> None:
    """One ShardingWarning when running with ``plan`` drops mesh axes from an operand."""
    lines = []
    for i, (arg, have, spec) in enumerate(zip(args, dims, plan.in_specs)):
        ndim = len(arg.shape)
        want = sharding_lib.spec_axes(spec, ndim)
        if have is None:
            lines.append(f"  {cls._operand_name(i)} {tuple(arg.shape)} has a sharding that does not use whole "
                         f"mesh axes ({arg.sharding}) -> {describe(want)}")
            continue
        lost = sorted({a for h, w in zip(have, want) for a in h if a not in w})
        if lost:
            lines.append(
                f"  {cls._operand_name(i)} {tuple(arg.shape)} {describe(have)} -> {describe(want)} "
                f"(loses mesh axes {lost}: an all-gather or all-to-all)"
            )
    if lines:
        why = "".join(f"\n  why: {n}" for n in plan.notes)
        warnings.warn(
            f"jax_mxfp4: {cls.name} cannot run with its operands' shardings; XLA reshards them, which costs "
            "communication:\n" + "\n".join(lines) + why,
            ShardingWarning,
            stacklevel=2,
        )


def _named(mesh, specs):
    return tuple(NamedSharding(mesh, s) for s in specs)


def _wrap_results(cls, out_specs_or_shardings):
    return tuple(out_specs_or_shardings) if cls.multiple_results else out_specs_or_shardings[0]


def _make_partitioned(cls, inner: Primitive):
    n_work = cls.num_workspace_results

    def call_inner(params: _Params, *args):
        out = inner.bind(*args, **params.kw)
        if not inner.multiple_results:
            return out
        out = tuple(out)[: len(out) - n_work]
        return out if cls.multiple_results else out[0]

    def partition(params, mesh, arg_infos, result_infos):
        del result_infos  # The plan decides; XLA reshards results to what users want.
        plan, dims = _plan(cls, mesh, arg_infos, params)
        _warn_about_gathers(cls, arg_infos, dims, plan)
        body = plan.local or (lambda *a: call_inner(params, *a))

        def local(*a):
            out = body(*a)
            return tuple(out) if cls.multiple_results else out

        return mesh, local, _wrap_results(cls, _named(mesh, plan.out_specs)), _named(mesh, plan.in_specs)

    def infer_sharding_from_operands(params, mesh, arg_infos, result_infos):
        del result_infos
        return _wrap_results(cls, _named(mesh, _plan(cls, mesh, arg_infos, params)[0].out_specs))

    def sharding_rule(params, mesh, operand_types, result_types):
        shapes = lambda types: tuple(tuple(mlir.ir.RankedTensorType(t).shape) for t in types)  # noqa: E731
        return cls.sharding_rule(mesh, shapes(operand_types), shapes(result_types), **params.kw)

    wrapped = custom_partitioning(call_inner, static_argnums=(0,))
    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer_sharding_from_operands,
        sharding_rule=sharding_rule,
        # Operands reach partition() as jax decodes them only if every
        # dimension uses whole mesh axes; Shardy may pick sub-axes, which
        # would fail inside jax. sharding.decode handles both.
        decode_shardings=False,
    )
    return wrapped


def _explicit_out_shardings(cls, avals, params):
    """Output shardings for the types of explicit-sharding mode (``AxisType.Explicit`` meshes).

    There, an array's type carries its sharding; the plan's output specs,
    restricted to the explicit axes, are the results' types. None otherwise.
    """
    meshes = {a.sharding.mesh for a in avals if isinstance(getattr(a, "sharding", None), NamedSharding)}
    explicit = [m for m in meshes if jax.sharding.AxisType.Explicit in tuple(getattr(m, "axis_types", ()))]
    if len(explicit) != 1 or len(meshes) != 1:
        return None
    mesh = explicit[0]
    args = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in avals)
    plan = cls.partition(mesh, args, **params)
    keep = {n for n, t in zip(mesh.axis_names, mesh.axis_types) if t == jax.sharding.AxisType.Explicit}
    specs = [sharding_lib.to_spec([tuple(a for a in axes if a in keep) for axes in
                                   sharding_lib.spec_axes(spec, len(spec))]) for spec in plan.out_specs]
    return [NamedSharding(mesh, spec) for spec in specs]


def _requires_devices_during_lowering(prim: Primitive) -> None:
    # custom_partitioning needs the device assignment when it is lowered; jax
    # only provides it for primitives in this registry (TransformerEngine
    # registers its outer primitives the same way). There is no public API.
    from jax._src import dispatch

    dispatch.prim_requires_devices_during_lowering.add(prim)


# ---------------------------------------------------------------------------
# Registration.


@functools.lru_cache(maxsize=None)
def _jitted(prim: Primitive, params: _Params):
    return jax.jit(lambda *a: prim.bind(*a, **params.kw))


def _eager(prim, *args, **params):
    """Eager ``bind``: one jitted function per (primitive, params), so repeated calls reuse it."""
    return _jitted(prim, _Params.of(params))(*args)


def register_primitive(cls: type[FfiPrimitive]) -> type[FfiPrimitive]:
    """Class decorator: creates ``cls.primitive`` (and ``cls.inner_primitive``), registers all rules."""
    partitioned = cls.is_partitioned()
    if cls.num_workspace_results and not partitioned:
        raise TypeError(f"{cls.__name__}: num_workspace_results needs partition()/sharding_rule().")

    inner = Primitive(f"{cls.name}_local" if partitioned else cls.name)
    inner.multiple_results = cls.multiple_results or cls.num_workspace_results > 0
    inner.def_abstract_eval(cls.abstract_eval)

    inner.def_impl(functools.partial(_eager, inner))
    for platform in cls.platforms:
        mlir.register_lowering(inner, cls._lowering(platform), platform=platform)
    if cls.fallback is not None:
        # Any other platform (e.g. TPU, ROCm) lowers the pure-jnp definition.
        fallback = cls.fallback
        if cls.num_workspace_results:
            raise TypeError(f"{cls.__name__}: a fallback cannot produce workspace results.")
        mlir.register_lowering(inner, mlir.lower_fun(fallback, multiple_results=cls.multiple_results))
    cls.inner_primitive = inner

    if not partitioned:
        batching.primitive_batchers[inner] = cls.batch
        cls.primitive = inner
        return cls

    outer = Primitive(cls.name)
    outer.multiple_results = cls.multiple_results

    def outer_abstract_eval(*avals, **params):
        out = cls.abstract_eval(*avals, **params)
        outs = list(out) if inner.multiple_results else [out]
        outs = outs[: len(outs) - cls.num_workspace_results]
        shardings = _explicit_out_shardings(cls, avals, params)
        if shardings is not None:
            outs = [o.update(sharding=s) for o, s in zip(outs, shardings)]
        return tuple(outs) if cls.multiple_results else outs[0]

    outer.def_abstract_eval(outer_abstract_eval)
    outer.def_impl(functools.partial(_eager, outer))
    partitioned_call = _make_partitioned(cls, inner)

    def outer_lowering(*args, **params):
        return partitioned_call(_Params.of(params), *args)

    mlir.register_lowering(outer, mlir.lower_fun(outer_lowering, multiple_results=cls.multiple_results))
    _requires_devices_during_lowering(outer)
    batching.primitive_batchers[outer] = cls.batch
    cls.primitive = outer
    return cls
