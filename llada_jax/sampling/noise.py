"""Random numbers of the samplers: Gumbel noise for temperature sampling, uniform scores for random remasking.

Every draw is keyed by (row key, step, stream) and counted by (position of the token in its unpadded
sequence, vocabulary index), so a row's randomness does not depend on the other rows of the batch or on its
left padding: a prompt sampled with the same row key gives the same tokens alone or in any batch (the batch
sampler gives each example the key fold_in(key(seed), example_index), which makes `--resume` reproduce an
uninterrupted run).

Gumbel-max. The official sampler draws x0 = argmax(exp(logits) / (-log U) ** T) in float64, which is a
sample from softmax(logits / T). The same argmax is argmax(logits + T * G) with G = -log(-log U) a standard
Gumbel variable. Float32 uniforms (24 bits) would cut G's upper tail at about 16.6 and quantise it coarsely
there, which is the precision loss the official comment warns about (arXiv:2409.02908). Here each uniform
takes 64 random bits (both output words of one Threefry-2x32 hash): V = 1 - U = hi * 2^-32 + (lo + 1/2) *
2^-64 keeps full float32 relative precision down to 2^-65, and E = -log(U) = -log1p(-V), so G reaches about
44 (the float64 original reaches 36.7).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry2x32_p

GUMBEL_STREAM = 0
RANDOM_STREAM = 1


def row_keys(rng, batch: int) -> jax.Array:
    """Typed PRNG keys [batch]: one per row.

    `rng` is None (key 0), an int seed, one key (typed, or raw uint32 [2]) whose rows get fold_in(key, row),
    or `batch` keys (typed [batch], or raw uint32 [batch, 2]) used as they are.
    """
    if rng is None:
        rng = 0
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(int(rng))
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


def step_keys(keys: jax.Array, step, stream: int) -> jax.Array:
    """Keys [B] of one step and stream: fold_in(fold_in(row key, step), stream)."""
    return jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, step), stream))(keys)


def _bits64(keys: jax.Array, positions: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
    """Two independent uint32 words [B, L, width] for every (row key, position, index < width)."""
    shape = positions.shape + (width,)
    pos = jnp.broadcast_to(positions.astype(jnp.uint32)[..., None], shape)
    index = jnp.broadcast_to(jnp.arange(width, dtype=jnp.uint32), shape)
    if str(jax.random.key_impl(keys)) == "threefry2x32":  # one hash gives both words
        data = jax.random.key_data(keys)  # [B, 2]
        k1 = jnp.broadcast_to(data[:, 0, None, None], shape)
        k2 = jnp.broadcast_to(data[:, 1, None, None], shape)
        return tuple(threefry2x32_p.bind(k1, k2, pos, index))

    def per_position(key, p):  # any other PRNG implementation
        return jax.random.bits(jax.random.fold_in(key, p), (2, width), jnp.uint32)

    bits = jax.vmap(lambda k, ps: jax.vmap(lambda p: per_position(k, p))(ps))(keys, positions.astype(jnp.uint32))
    return bits[..., 0, :], bits[..., 1, :]


def gumbel(keys: jax.Array, positions: jax.Array, vocab: int) -> jax.Array:
    """Standard Gumbel noise float32 [B, L, vocab] from 64 random bits per value."""
    hi, lo = _bits64(keys, positions, vocab)
    v = hi.astype(jnp.float32) * jnp.float32(2.0**-32) + (lo.astype(jnp.float32) + 0.5) * jnp.float32(2.0**-64)
    v = jnp.minimum(v, jnp.float32(1.0 - 2.0**-24))  # hi near 2^32 rounds to 1.0 in float32
    return -jnp.log(-jnp.log1p(-v))


def uniform(keys: jax.Array, positions: jax.Array) -> jax.Array:
    """U[0, 1) float32 [B, L] with 24-bit resolution (like torch.rand): the `random` remasking confidence."""
    hi, _ = _bits64(keys, positions, 1)
    return (hi[..., 0] >> 8).astype(jnp.float32) * jnp.float32(2.0**-24)
