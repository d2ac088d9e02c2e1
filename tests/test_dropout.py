"""The unrolled threefry dropout equals ``jax.random.bernoulli`` bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loraprune_jax.core.dropout import dropout, keep_mask, threefry2x32

KEYS = {
    "PRNGKey(0)": jax.random.PRNGKey(0),
    "PRNGKey(2**31-1)": jax.random.PRNGKey(2**31 - 1),
    "split": jax.random.split(jax.random.PRNGKey(5), 7)[3],
    "fold_in": jax.random.fold_in(jax.random.PRNGKey(1), 41),
    "typed": jax.random.key(9),
}
SHAPES = [(1,), (5,), (3, 7), (2, 33, 65), (1, 1, 1), (4, 3, 5, 7)]


@pytest.mark.parametrize("name", sorted(KEYS))
@pytest.mark.parametrize("shape", SHAPES)
def test_keep_mask_equals_bernoulli(name: str, shape: tuple[int, ...]) -> None:
    key = KEYS[name]
    for p in (0.95, 0.5, 0.1, 1.0, 0.0):
        expected = np.asarray(jax.random.bernoulli(key, p, shape))
        np.testing.assert_array_equal(np.asarray(keep_mask(key, p, shape)), expected)
        jitted = jax.jit(keep_mask, static_argnums=(1, 2))(key, p, shape)
        np.testing.assert_array_equal(np.asarray(jitted), expected)


def test_keep_mask_inside_scan_over_split_keys() -> None:
    """The train step draws one key per layer inside a scan: same masks as bernoulli there."""
    keys = jax.random.split(jax.random.PRNGKey(3), 4)

    def run(fn):
        def body(c, k):
            return c, fn(k, 0.95, (2, 8, 16))
        return jax.lax.scan(body, 0, keys)[1]

    np.testing.assert_array_equal(np.asarray(jax.jit(lambda: run(keep_mask))()),
                                  np.asarray(jax.jit(lambda: run(jax.random.bernoulli))()))


def test_threefry_known_answer() -> None:
    """Random123's published known-answer vectors for threefry-2x32 with 20 rounds."""
    cases = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
             ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
             ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
    for (k1, k2), (x1, x2), want in cases:
        got = threefry2x32(*(jnp.uint32(v) for v in (k1, k2, x1, x2)))
        assert (int(got[0]), int(got[1])) == want


def test_dropout_rate_scale_and_identity() -> None:
    x = jnp.ones((64, 128), jnp.float32)
    key = jax.random.PRNGKey(0)
    y = np.asarray(dropout(x, 0.25, key))
    kept = y != 0
    np.testing.assert_allclose(y[kept], 1 / 0.75, rtol=1e-7)
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(jax.random.bernoulli(key, 0.75, x.shape)))
    assert dropout(x, 0.0, key) is x
    assert dropout(x, 0.25, None) is x


def test_falls_back_to_bernoulli_without_partitionable_threefry() -> None:
    key = jax.random.PRNGKey(7)
    with jax.threefry_partitionable(False):
        expected = np.asarray(jax.random.bernoulli(key, 0.9, (6, 10)))
        np.testing.assert_array_equal(np.asarray(keep_mask(key, 0.9, (6, 10))), expected)


def test_other_prng_impl_falls_back() -> None:
    key = jax.random.key(3, impl="rbg")
    expected = np.asarray(jax.random.bernoulli(key, 0.9, (6, 10)))
    np.testing.assert_array_equal(np.asarray(keep_mask(key, 0.9, (6, 10))), expected)
