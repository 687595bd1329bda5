"""Random numbers of the samplers: Gumbel noise for temperature sampling, uniform scores for random remasking.

Every draw is keyed by (row key, step, position of the token in its unpadded sequence, stream), so a row's
randomness does not depend on the other rows of the batch or on its left padding: a prompt sampled with the
same row key gives the same tokens alone or in any batch (the batch sampler gives each example the key
`fold_in(key(seed), example_index)`, which makes `--resume` reproduce an uninterrupted run).

Gumbel-max. The official sampler draws x0 = argmax(exp(logits) / (-log U) ** T) in float64, which is a
sample from softmax(logits / T). The same argmax is argmax(logits + T * G) with G = -log(-log U) a standard
Gumbel variable. Float32 uniforms (24 bits) would cut G's upper tail at about 16.6 and quantise it coarsely
there, which is the precision loss the official comment warns about (arXiv:2409.02908). Here each uniform
takes 64 random bits: V = 1 - U = hi * 2^-32 + (lo + 1/2) * 2^-64 keeps its full float32 relative precision
down to 2^-65, and E = -log(U) = -log1p(-V), so G reaches about 44 (the float64 original reaches 36.7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

GUMBEL_STREAM = 0
RANDOM_STREAM = 1


def row_keys(rng, batch: int) -> jax.Array:
    """Typed PRNG keys [batch]: one per row.

    `rng` is None (key 0), an int seed, one key (typed, or raw uint32 [2]) whose rows get fold_in(key, row),
    or `batch` keys (typed [batch], or raw uint32 [batch, 2]) used as they are.
    """
    if rng is None:
        rng = 0
    if isinstance(rng, int):
        rng = jax.random.key(rng)
    rng = jnp.asarray(rng) if not isinstance(rng, jax.Array) else rng
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.dtype != jnp.uint32 or rng.shape[-1:] != (2,):
            raise ValueError(f"rng: expected an int seed or JAX PRNG key(s), got dtype {rng.dtype} shape {rng.shape}")
        rng = jax.random.wrap_key_data(rng)
    if rng.shape == ():
        return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch, dtype=jnp.uint32))
    if rng.shape != (batch,):
        raise ValueError(f"rng: expected one key or {batch} keys (one per row), got key shape {rng.shape}")
    return rng


def position_keys(keys: jax.Array, step, positions: jax.Array, stream: int) -> jax.Array:
    """Keys [B, L] for one step: fold_in(fold_in(fold_in(row key, step), stream), position)."""

    def per_row(key, pos):
        k = jax.random.fold_in(jax.random.fold_in(key, step), stream)
        return jax.vmap(lambda p: jax.random.fold_in(k, p))(pos)

    return jax.vmap(per_row)(keys, positions.astype(jnp.uint32))


def gumbel(keys: jax.Array, vocab: int) -> jax.Array:
    """Standard Gumbel noise float32 [*keys.shape, vocab] from 64 random bits per value."""
    bits = jax.vmap(lambda k: jax.random.bits(k, (2, vocab), jnp.uint32))(keys.reshape(-1))
    hi, lo = bits[:, 0].astype(jnp.float32), bits[:, 1].astype(jnp.float32)
    v = hi * jnp.float32(2.0**-32) + (lo + 0.5) * jnp.float32(2.0**-64)  # 1 - U, in (0, 1]
    v = jnp.minimum(v, jnp.float32(1.0 - 2.0**-24))  # hi near 2^32 rounds to 1.0 in float32
    g = -jnp.log(-jnp.log1p(-v))
    return g.reshape(*keys.shape, vocab)


def uniform(keys: jax.Array) -> jax.Array:
    """U[0, 1) float32 with the shape of `keys` (the `random` remasking confidence, like torch.rand)."""
    flat = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(keys.reshape(-1))
    return flat.reshape(keys.shape)
