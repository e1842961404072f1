"""Sharding MXFP4 tensors over a device mesh (DESIGN.md section 8).

An MXFP4 weight is two arrays with the output feature N as rows:
``packed uint8[N, K/2]`` (two E2M1 codes per byte) and linear
``scales uint8[N, K/32]`` (one E8M0 byte per 32 elements of K). They shard

* along N (column-parallel): both arrays split by rows, the GEMM stays local;
* along K (row-parallel): both arrays split by columns *in whole 32-element
  blocks*, so a K shard holds ``K / shards`` elements, a multiple of 32: its
  packed shard is a multiple of 16 bytes and its scale shard whole bytes. The
  GEMM computes a partial product per shard and all-reduces it once.

``weight_shardings`` builds the pair of ``NamedSharding`` for a layer and
checks the block rule; ``shard_weights`` places the arrays. Weights already
prepared for a kernel (``jax_mxfp4.prepare_weights``) are placed with
``shard_prepared_weights`` (``prepared_weight_shardings``): each kernel says
how its own layout splits (Marlin: ``kernels.marlin_weights.prepared_specs``).

The rest of this module is what the primitives' partition rules share (see
``jax_mxfp4.primitives.base``): reading a sharding as mesh axes per dimension,
keeping only the axes a dimension can be split over, and the
``ShardingWarning`` raised when a sharding the rules cannot honour is
resharded at the cost of a gather.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jax_mxfp4.formats import BLOCK_SIZE

__all__ = [
    "RuleBuilder",
    "ShardingWarning",
    "LinearSharding",
    "plan_linear",
    "prepared_weight_shardings",
    "shard_prepared_weights",
    "shard_weights",
    "weight_shardings",
]

Axes = tuple[str, ...]


class ShardingWarning(UserWarning):
    """A sharding the MXFP4 partition rules cannot honour was resharded (costs communication)."""


# ---------------------------------------------------------------------------
# Weights.


def _as_axes(axis: str | Sequence[str] | None) -> Axes:
    if axis is None:
        return ()
    if isinstance(axis, str):
        return (axis,)
    return tuple(axis)


def _entry(axes: Axes):
    """A PartitionSpec entry for mesh axes: None, one name, or a tuple."""
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else tuple(axes)


def axes_size(mesh: Mesh, axes: Axes) -> int:
    """Number of shards of a dimension split over mesh ``axes``."""
    return math.prod(int(mesh.shape[a]) for a in axes)


def weight_shardings(mesh: Mesh, *, n_axis=None, k_axis=None, shape: tuple[int, int] | None = None):
    """``(NamedSharding for packed [N, K/2], NamedSharding for scales [N, K/32])``.

    Args:
      mesh: the device mesh.
      n_axis: mesh axis name (or tuple of names) to split N over (column-parallel), or None.
      k_axis: mesh axis name(s) to split K over (row-parallel), or None.
      shape: optional ``(N, K)`` of the layer (K in elements); when given, the
        split is checked: ``N`` must divide evenly and every K shard must hold a
        multiple of 32 elements (whole scale blocks). ``ValueError`` otherwise.
    """
    n_axes, k_axes = _as_axes(n_axis), _as_axes(k_axis)
    for a in n_axes + k_axes:
        if a not in mesh.shape:
            raise ValueError(f"mesh axis {a!r} is not in the mesh (axes {tuple(mesh.axis_names)}).")
    if set(n_axes) & set(k_axes):
        raise ValueError(f"N and K cannot both be split over mesh axes {sorted(set(n_axes) & set(k_axes))}.")
    if shape is not None:
        n, k = (int(d) for d in shape)
        pn, pk = axes_size(mesh, n_axes), axes_size(mesh, k_axes)
        if n % pn:
            raise ValueError(f"N={n} does not split evenly over mesh axes {n_axes} ({pn} shards).")
        if k % (pk * BLOCK_SIZE):
            raise ValueError(
                f"K={k} split over mesh axes {k_axes} ({pk} shards) gives K shards of {k / pk:g} elements; "
                f"a K shard must hold whole {BLOCK_SIZE}-element MXFP4 blocks (K a multiple of "
                f"{pk * BLOCK_SIZE})."
            )
    spec = PartitionSpec(_entry(n_axes), _entry(k_axes))
    return NamedSharding(mesh, spec), NamedSharding(mesh, spec)


def shard_weights(w_packed, w_scales, mesh: Mesh, *, n_axis=None, k_axis=None):
    """Places canonical weights on ``mesh`` split along N and/or K (see ``weight_shardings``)."""
    n, k = int(w_packed.shape[0]), int(w_packed.shape[1]) * 2
    packed_sharding, scales_sharding = weight_shardings(mesh, n_axis=n_axis, k_axis=k_axis, shape=(n, k))
    return jax.device_put(w_packed, packed_sharding), jax.device_put(w_scales, scales_sharding)


def check_whole_units(mesh: Mesh, axes: Axes, size: int, unit: int, dim: str, what: str) -> None:
    """``ValueError`` unless ``dim`` (of ``size``) splits over mesh ``axes`` into shards of
    whole ``unit``-element ``what`` (a prepared layout's atom)."""
    shards = axes_size(mesh, axes)
    if size % (unit * shards):
        raise ValueError(f"{dim}={size} split over mesh axes {axes} ({shards} shards): the prepared layout splits "
                         f"{dim} only into whole {unit}-element {what} ({dim} a multiple of {unit * shards}).")


def prepared_weight_shardings(weights, mesh: Mesh, *, n_axis=None, k_axis=None):
    """``NamedSharding`` of each array of prepared weights (a ``PreparedWeights`` whose
    arrays are shardings, for ``jax.device_put`` or ``jax.jit``'s in/out shardings),
    for the layer split along N over ``n_axis`` and along K over ``k_axis``.

    The layout is the preparing kernel's (``Mxfp4LinearKernel.prepared_specs``): the
    canonical kernels split both arrays like ``weight_shardings``; Marlin splits
    ``tiles`` along K and N and ``scales`` along N only. ``ValueError`` for a split
    the checkpoint layout (whole 32-element K blocks, even N) or the kernel's layout
    cannot take.
    """
    from jax_mxfp4.kernels.base import get_kernel

    config = weights.config
    weight_shardings(mesh, n_axis=n_axis, k_axis=k_axis, shape=(config.out_features, config.in_features))
    specs = get_kernel(weights.kernel).prepared_specs(config, mesh, _as_axes(n_axis), _as_axes(k_axis))
    return dataclasses.replace(weights, arrays={name: NamedSharding(mesh, specs[name]) for name in weights.arrays})


def shard_prepared_weights(weights, mesh: Mesh, *, n_axis=None, k_axis=None):
    """Places prepared weights on ``mesh`` split along N and/or K (``prepared_weight_shardings``)."""
    return jax.device_put(weights, prepared_weight_shardings(weights, mesh, n_axis=n_axis, k_axis=k_axis))


def explicit_linear_sharding(x, w):
    """Result sharding of ``x[..., K] @ w[N, K]^T`` on an explicit-axes mesh, else None.

    With ``jax.sharding.AxisType.Explicit`` axes, jnp ops need the result's
    sharding when the contracted K is split (JAX then sums the partial
    products, one all-reduce); it is x's leading dims' axes, then w's N axes
    (unless x already uses one of them). None when the operands are not typed
    with an explicit-axes mesh (Auto meshes, no mesh, or inside shard_map).
    """
    x_sh, w_sh = getattr(jax.typeof(x), "sharding", None), getattr(jax.typeof(w), "sharding", None)
    mesh = getattr(x_sh, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        return None
    if not any(t == jax.sharding.AxisType.Explicit for t in getattr(mesh, "axis_types", ())):
        return None
    lead = spec_axes(x_sh, x.ndim)[:-1]
    n_axes = spec_axes(w_sh, 2)[0] if w_sh is not None else ()
    if set(n_axes) & {a for axes in lead for a in axes}:
        n_axes = ()
    return NamedSharding(mesh, to_spec([*lead, n_axes]))


# ---------------------------------------------------------------------------
# Helpers for partition rules.


def spec_axes(sharding, ndim: int) -> list[Axes]:
    """Mesh axes each of ``ndim`` dimensions is split over, read from a ``NamedSharding``
    or a ``PartitionSpec``. Anything else (None) reads as replicated.
    """
    out: list[Axes] = [()] * ndim
    spec = sharding.spec if isinstance(sharding, NamedSharding) else sharding
    if isinstance(spec, PartitionSpec):
        for d, entry in enumerate(tuple(spec)[:ndim]):
            if entry is None or entry is PartitionSpec.UNCONSTRAINED:
                continue
            out[d] = _as_axes(entry)
    return out


def decode(sharding, shape, mesh: Mesh) -> list[Axes] | None:
    """Mesh axes per dimension of any ``jax.sharding.Sharding`` of an array of ``shape`` on ``mesh``.

    Returns None when the sharding is not "whole mesh axes per dimension"
    (e.g. Shardy split a mesh axis into sub-axes, or the devices are not the
    mesh's). Uses only public ``Sharding`` methods: the number of shards of
    each dimension comes from ``shard_shape``, then the few assignments of
    mesh axes with those products are tested with ``is_equivalent_to``.
    """
    ndim = len(shape)
    if sharding is None:
        return [()] * ndim
    if isinstance(sharding, NamedSharding) and dict(sharding.mesh.shape) == dict(mesh.shape) and (
            sharding.mesh.axis_names == mesh.axis_names):
        return spec_axes(sharding, ndim)
    try:
        local = sharding.shard_shape(tuple(shape))
    except Exception:  # noqa: BLE001 - anything not expressible reads as unknown
        return None
    counts = [g // n if n else 1 for g, n in zip(shape, local)]
    axes = [a for a in mesh.axis_names if int(mesh.shape[a]) > 1]

    def options(count, free):
        # Ordered tuples of distinct free axes whose sizes multiply to count.
        if count == 1:
            yield ()
            return
        for a in free:
            size = int(mesh.shape[a])
            if count % size == 0:
                for rest in options(count // size, [b for b in free if b != a]):
                    yield (a, *rest)

    def assign(d, free):
        if d == ndim:
            yield []
            return
        for choice in options(counts[d], free):
            for tail in assign(d + 1, [a for a in free if a not in choice]):
                yield [choice, *tail]

    for dims in assign(0, axes):
        if sharding.is_equivalent_to(NamedSharding(mesh, to_spec(dims)), ndim):
            return dims
    return None


def to_spec(dims: Sequence[Axes]) -> PartitionSpec:
    """Mesh axes per dimension -> ``PartitionSpec``."""
    return PartitionSpec(*(_entry(tuple(a)) for a in dims))


def dividing_prefix(mesh: Mesh, axes: Axes, size: int, multiple: int = 1, exclude=()) -> Axes:
    """The longest prefix of ``axes`` (skipping none) that splits ``size`` into equal shards
    that are multiples of ``multiple``, using no axis in ``exclude``."""
    kept: list[str] = []
    for a in axes:
        if a in exclude or a in kept:
            break
        if size % (axes_size(mesh, (*kept, a)) * multiple):
            break
        kept.append(a)
    return tuple(kept)


class RuleBuilder:
    """Builds a Shardy einsum-like rule whose dimensions are compounds of sized factors.

    ``dim(("k", 4), ("b", 32))`` gives the text of a dimension made of
    factor k (major) and b (minor), e.g. ``"(k b)"``. Shardy rejects
    size-1 factors inside compounds, and factor sizes may be declared only
    for factors never used as a whole dimension; the builder handles both
    (a size-1 factor is dropped, a dimension left with one factor is that
    factor, one left with none gets a fresh size-1 factor). ``sizes()``
    gives the sizes to declare.
    """

    def __init__(self):
        self._sizes: dict[str, int] = {}
        self._whole: set[str] = set()
        self._fresh = 0

    def dim(self, *factors: tuple[str, int]) -> str:
        kept = [(name, int(size)) for name, size in factors if int(size) != 1]
        for name, size in kept:
            if self._sizes.setdefault(name, size) != size:
                raise ValueError(f"factor {name} used with sizes {self._sizes[name]} and {size}")
        if not kept:
            self._fresh += 1
            name = f"unit{self._fresh}"
            self._whole.add(name)
            return name
        if len(kept) == 1:
            self._whole.add(kept[0][0])
            return kept[0][0]
        return "(" + " ".join(name for name, _ in kept) + ")"

    def used(self, *names: str) -> tuple[str, ...]:
        """The given factors that appear in the rule (e.g. for ``reduction_factors``)."""
        return tuple(n for n in names if n in self._sizes or n in self._whole)

    def sizes(self) -> dict[str, int]:
        return {n: s for n, s in self._sizes.items() if n not in self._whole}


def describe(dims: Sequence[Axes]) -> str:
    return str(to_spec(dims))


@dataclasses.dataclass(frozen=True)
class LinearSharding:
    """How ``y[..., N] = x[..., K] @ W[N, K]^T`` runs over a mesh.

    ``lead`` are the mesh axes of each of x's leading (token) dims, ``n`` and
    ``k`` those of N and K. A non-empty ``k`` means row-parallel: each device
    computes a partial product and the result is all-reduced over ``k``.
    ``notes`` explain every sharding that had to be dropped.
    """

    lead: tuple[Axes, ...]
    n: Axes
    k: Axes
    notes: tuple[str, ...] = ()

    @property
    def x_spec(self) -> PartitionSpec:
        return to_spec((*self.lead, self.k))

    @property
    def w_spec(self) -> PartitionSpec:
        return to_spec((self.n, self.k))

    @property
    def y_spec(self) -> PartitionSpec:
        return to_spec((*self.lead, self.n))


def plan_linear(mesh: Mesh, x_shape, x_sharding, n: int, k: int, w_n: Axes, w_k: Axes,
                *, k_multiple: int = BLOCK_SIZE, n_multiple: int = 1) -> LinearSharding:
    """The sharding an MXFP4 linear layer runs with, from its operands' shardings.

    The weights' sharding wins (so weights are never gathered): N keeps the
    weights' N axes and K their K axes. If the weights are not split along K
    but x is, K follows x (the weights are then sliced, not gathered). K axes
    are kept only while every K shard stays a multiple of ``k_multiple``
    elements (whole MXFP4 blocks), N axes only while N splits evenly into
    shards of whole ``n_multiple`` features (a prepared layout's units). x's
    token dims keep their axes unless an axis is already used by N or K, or
    does not split the dim evenly; x is then resharded (a gather of
    activations, reported in ``notes``).
    """
    notes: list[str] = []
    x_dims = spec_axes(x_sharding, len(x_shape))
    n_axes = dividing_prefix(mesh, w_n, n, n_multiple)
    if n_axes != w_n:
        unit = f" into shards of whole {n_multiple}-feature units" if n_multiple > 1 else " evenly"
        notes.append(f"N={n} does not split{unit} over mesh axes {w_n}; N is split over {n_axes or 'none'}.")
    k_wanted = w_k or x_dims[-1]
    k_axes = dividing_prefix(mesh, k_wanted, k, k_multiple, exclude=n_axes)
    if k_axes != k_wanted:
        notes.append(
            f"K={k} split over mesh axes {k_wanted} ({axes_size(mesh, k_wanted)} shards) does not give whole "
            f"{k_multiple}-element blocks per shard (or reuses an N axis); K is split over {k_axes or 'none'}."
        )
    used = set(n_axes) | set(k_axes)
    lead = []
    for d, axes in enumerate(x_dims[:-1]):
        kept = dividing_prefix(mesh, axes, int(x_shape[d]), exclude=used)
        if kept != axes:
            notes.append(
                f"x's dim {d} (size {x_shape[d]}) over mesh axes {axes}: the axes are used by the weights' N/K "
                f"sharding or do not split it evenly; kept {kept or 'none'}."
            )
        used |= set(kept)
        lead.append(kept)
    return LinearSharding(tuple(lead), n_axes, k_axes, tuple(notes))
