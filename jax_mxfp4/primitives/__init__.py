"""JAX primitives backed by the package's XLA FFI custom calls.

One module per primitive; each holds the primitive's class with its abstract
evaluation, lowering, batching (and sharding) rules side by side.
"""
