"""Scale layouts: the one shape function, swizzle vs the explicit formula, C++ mirror."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_mxfp4 import _native, layout

ROWS = [1, 31, 127, 128, 129, 200, 4096 + 32]
KS = [32, 64, 96, 128, 160, 4096, 4128]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", KS)
def test_scale_shape(rows, k):
    kb = k // 32
    assert layout.scale_shape(rows, k, "linear") == (rows, kb)
    padded = layout.scale_shape(rows, k, "swizzled_128x4")
    assert padded == (-(-rows // 128) * 128, -(-kb // 4) * 4)
    assert padded[0] % 128 == 0 and padded[1] % 4 == 0
    assert padded[0] >= rows and padded[1] >= kb


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", [32, 160, 4128])
def test_cpp_mirror_agrees(rows, k):
    for lay in layout.ScaleLayout:
        assert tuple(_native.ext.scale_shape(rows, k, int(lay))) == layout.scale_shape(rows, k, lay)
    kb = k // 32
    table = layout.swizzled_offsets_table(rows, k)
    for r in {0, rows // 2, rows - 1}:
        for c in {0, kb // 2, kb - 1}:
            assert _native.ext.swizzled_offset(r, c, kb) == table[r, c]


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("k", [32, 96, 160, 4128])
def test_swizzle_matches_offset_formula(rows, k, rng):
    kb = k // 32
    scales = rng.integers(1, 255, size=(rows, kb), dtype=np.uint8)
    buf = np.asarray(layout.swizzle_scales(jnp.asarray(scales)))
    assert buf.shape == layout.scale_shape(rows, k, "swizzled_128x4")
    flat = buf.reshape(-1)
    offsets = layout.swizzled_offsets_table(rows, k)
    np.testing.assert_array_equal(flat[offsets], scales)
    # Every byte not addressed by a real scale is zero padding.
    mask = np.ones(flat.size, bool)
    mask[offsets.reshape(-1)] = False
    assert not flat[mask].any()
    # The formula is a bijection onto the unpadded positions.
    assert len(np.unique(offsets)) == offsets.size
    np.testing.assert_array_equal(np.asarray(layout.unswizzle_scales(jnp.asarray(buf), rows, k)), scales)


def test_swizzle_folds_leading_dims(rng):
    scales = rng.integers(0, 255, size=(3, 50, 5), dtype=np.uint8)
    got = layout.swizzle_scales(jnp.asarray(scales))
    want = layout.swizzle_scales(jnp.asarray(scales.reshape(150, 5)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_swizzle_under_jit(rng):
    scales = jnp.asarray(rng.integers(0, 255, size=(200, 5), dtype=np.uint8))
    np.testing.assert_array_equal(np.asarray(jax.jit(layout.swizzle_scales)(scales)),
                                  np.asarray(layout.swizzle_scales(scales)))


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match="scale_layout='swizzled' is not a scale layout"):
        layout.scale_shape(4, 32, "swizzled")
    with pytest.raises(ValueError, match="k=48 is not a multiple of 32"):
        layout.scale_shape(4, 48)
    with pytest.raises(ValueError, match=r"buf has shape \(128, 8\) but 200 rows of K=160 swizzle to \(256, 8\)"):
        layout.unswizzle_scales(jnp.zeros((128, 8), jnp.uint8), 200, 160)
    with pytest.raises(ValueError, match="scales must be uint8"):
        layout.swizzle_scales(jnp.zeros((4, 1), jnp.float32))
