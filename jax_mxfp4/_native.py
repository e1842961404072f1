"""Loads the compiled extension ``jax_mxfp4._ext`` and registers its FFI targets.

The extension's ``registrations()`` is the single list of custom-call target
names in C++; primitives name their target once (``FfiPrimitive.target``) and
``require_target`` checks it exists for the platform being lowered to, so a
misspelt or missing target is a clear error at trace time.
"""

from __future__ import annotations

import functools

import jax

try:
    from jax_mxfp4 import _ext
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "jax_mxfp4's native extension (jax_mxfp4._ext) is missing or failed to load "
        f"({err}). Reinstall the package with `pip install .` from the source tree, which "
        "compiles it (a C++17 compiler is required; nvcc adds the CUDA kernels)."
    ) from err

__all__ = [
    "cuda_compute_capability",
    "cuda_enabled",
    "ext",
    "is_cuda_device",
    "require_target",
    "targets",
]

ext = _ext

# Lowering platform names -> XLA platform names used by register_ffi_target.
_XLA_PLATFORM = {"cpu": "cpu", "cuda": "CUDA"}


@functools.cache
def targets() -> dict[str, frozenset[str]]:
    """{lowering platform: target names} compiled into this build, registered with XLA once."""
    out: dict[str, frozenset[str]] = {}
    for xla_platform, handlers in _ext.registrations().items():
        for name, capsule in handlers.items():
            jax.ffi.register_ffi_target(name, capsule, platform=xla_platform)
        platform = next(p for p, x in _XLA_PLATFORM.items() if x == xla_platform)
        out[platform] = frozenset(handlers)
    return out


def require_target(name: str, platform: str) -> None:
    """Raises ``RuntimeError`` unless custom-call target ``name`` exists for ``platform``."""
    available = targets().get(platform, frozenset())
    if name in available:
        return
    if platform == "cuda" and not cuda_enabled():
        raise RuntimeError(
            f"{name} has no CUDA implementation in this build: jax_mxfp4 was compiled without "
            "CUDA (no nvcc was found at install time). Reinstall with the CUDA toolkit on PATH, "
            "or pick the 'xla' kernel (JAX_MXFP4_KERNEL=xla)."
        )
    raise RuntimeError(
        f"custom call {name} is not available on platform {platform!r}; this build registers "
        f"{ {p: sorted(t) for p, t in targets().items()} }."
    )


def cuda_enabled() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return bool(_ext.cuda_enabled())


def cuda_compute_capability(device: jax.Device) -> tuple[int, int]:
    """(major, minor) of a CUDA ``jax.Device``; (0, 0) if unknown."""
    cc = getattr(device, "compute_capability", None)
    if isinstance(cc, str) and "." in cc:
        major, minor = cc.split(".", 1)
        return int(major), int(minor)
    if cuda_enabled():
        return tuple(_ext.cuda_compute_capability(int(getattr(device, "local_hardware_id", device.id) or 0)))
    return (0, 0)


def is_cuda_device(device: jax.Device) -> bool:
    """Whether ``device`` is an NVIDIA GPU driven by the CUDA plugin (not ROCm, not CPU)."""
    if device.platform != "gpu":
        return False
    version = str(getattr(device.client, "platform_version", "")).lower()
    return "rocm" not in version and "hip" not in version
