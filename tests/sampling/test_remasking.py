"""Pure pieces of a denoising decision: Gumbel-max temperature sampling and the noise behind it, argmax ties,
top-k and threshold selection."""

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.sampling import noise, remasking


def test_gumbel_max_samples_softmax_over_temperature():
    logits = jnp.tile(jnp.array([2.0, 1.0, 0.0, -1.0, 1.5, -jnp.inf]), (1, 4000, 1))  # 4000 positions
    temperature = 0.7
    keys = jax.random.split(jax.random.key(0), 5)
    positions = jnp.arange(4000)[None]
    predict = jax.jit(lambda k: remasking.predict(logits, temperature, k[None], positions))
    draws = jnp.concatenate([predict(k) for k in keys], 1)
    freq = np.bincount(np.asarray(draws).ravel(), minlength=6) / draws.size
    expected = np.asarray(jax.nn.softmax(logits[0, 0] / temperature))
    np.testing.assert_allclose(freq, expected, atol=0.012)
    assert freq[5] == 0
    gumbel = jax.jit(noise.gumbel, static_argnums=2)
    g = np.asarray(gumbel(keys[:4], jnp.arange(64)[None].repeat(4, 0), 1024)).ravel()  # 262k draws
    assert abs(g.mean() - 0.5772) < 0.01 and abs(g.var() - np.pi**2 / 6) < 0.03 and g.max() > 10
    u = np.asarray(jax.jit(noise.uniform)(keys[:2], positions.repeat(2, 0))).ravel()
    assert 0 <= u.min() < 0.001 and 0.999 < u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    # the fallback for other PRNG implementations draws the same distribution
    rbg = jax.random.split(jax.random.key(0, impl="rbg"), 4)
    g2 = np.asarray(gumbel(rbg, jnp.arange(64)[None].repeat(4, 0), 1024)).ravel()
    assert abs(g2.mean() - 0.5772) < 0.01 and abs(g2.var() - np.pi**2 / 6) < 0.03


def test_first_argmax_is_jnp_argmax():
    x = jax.random.normal(jax.random.key(0), (3, 7, 50))
    x = x.at[0, 0, 10].set(5.0).at[0, 0, 3].set(5.0).at[1, 1].set(-jnp.inf)  # a tie, an all -inf row
    np.testing.assert_array_equal(remasking.first_argmax(x), jnp.argmax(x, -1))


def test_select_top_k_ties_take_the_lowest_position():
    conf = jnp.array([[0.5, 0.9, 0.5, 0.5, -jnp.inf], [0.1, 0.2, 0.3, 0.4, 0.5]])
    sel = np.asarray(remasking.select_top_k(conf, jnp.array([3, 0]), 3))
    assert sel.tolist() == [[True, True, True, False, False], [False] * 5]


def test_select_threshold():
    conf = jnp.array([[0.2, 0.9, 0.95, -jnp.inf], [0.1, 0.3, 0.3, 0.2], [-jnp.inf] * 4])
    got = np.asarray(remasking.select_threshold(conf, 0.9)).tolist()
    assert got == [[False, True, True, False], [False, True, False, False], [False] * 4]
