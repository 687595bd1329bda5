"""The LLaDA network against direct formulas and an independent PyTorch implementation."""

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import LLaDAConfig, LLaDAForMaskedLM, sharding
from llada_jax.checkpoints.hf_keys import hf_state_dict
from llada_jax.model import apply_rope, count_params, rms_norm, rope_tables
from tests.torch_reference import llada_logits


def make_model(**overrides):
    config = LLaDAConfig.tiny(**overrides)
    return LLaDAForMaskedLM(config, rngs=nnx.Rngs(0))


def random_ids(seed, shape, vocab=500):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, dtype=jnp.int32)


def torch_logits(model, ids, mask=None):
    cfg = dataclasses.asdict(model.config)
    return llada_logits(hf_state_dict(model), cfg, np.asarray(ids), None if mask is None else np.asarray(mask))


# --- building blocks against numpy formulas --------------------------------------------------------------


def test_rms_norm_matches_numpy_formula():
    x = np.random.RandomState(0).randn(3, 5, 16).astype(np.float32)
    w = np.random.RandomState(1).randn(16).astype(np.float32)
    expected = x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + 1e-5) * w
    np.testing.assert_allclose(rms_norm(jnp.asarray(x), jnp.asarray(w), 1e-5), expected, rtol=1e-5, atol=1e-6)


def test_rms_norm_normalises_in_float32_for_bf16_input():
    import ml_dtypes

    rs = np.random.RandomState(0)
    x = jnp.asarray((rs.randn(64, 256) * rs.lognormal(0, 2, (64, 1))).astype(np.float32), jnp.bfloat16)
    out = rms_norm(x, jnp.ones(256, jnp.bfloat16), 1e-5)
    assert out.dtype == jnp.bfloat16
    # the exact normalisation (float64) rounded once to bf16: what a float32 computation gives
    x64 = np.asarray(x).astype(np.float64)
    ref = (x64 / np.sqrt(np.mean(x64**2, -1, keepdims=True) + 1e-5)).astype(ml_dtypes.bfloat16)
    differ = np.mean(np.asarray(out) != ref)
    assert differ <= 1e-3, differ
    # the same formula computed in bf16 misses that reference on about 30% of the elements: the check above
    # tells a float32 norm from a bf16 one
    in_bf16 = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), -1, keepdims=True) + 1e-5)
    assert np.mean(np.asarray(in_bf16) != ref) > 0.1


def test_rope_rotates_each_half_pair_by_position_times_frequency():
    hd, theta = 8, 10000.0
    x = np.random.RandomState(0).randn(1, 4, 2, hd).astype(np.float32)
    pos = np.array([[0, 1, 5, 17]])
    cos, sin = rope_tables(jnp.asarray(pos), hd, theta)
    out = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    half = hd // 2
    expected = np.empty_like(x)
    for i in range(half):
        angle = pos[..., None] * theta ** (-2 * i / hd)  # [1, L, 1]
        a, b = x[..., i], x[..., i + half]  # the pair (i, i + half) of the half-rotation convention
        expected[..., i] = a * np.cos(angle) - b * np.sin(angle)
        expected[..., i + half] = b * np.cos(angle) + a * np.sin(angle)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    # rotation preserves the norm and position 0 is the identity
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(out[:, 0], x[:, 0], rtol=1e-6)


# --- the whole model ---------------------------------------------------------------------------------------


def test_logits_shape_and_dtype():
    model = make_model()
    logits = model(random_ids(0, (2, 7)))
    assert logits.shape == (2, 7, 512) and logits.dtype == jnp.float32


def test_matches_independent_pytorch_implementation_fp32():
    model = make_model()
    ids = random_ids(1, (2, 12))
    np.testing.assert_allclose(np.asarray(model(ids)), torch_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_matches_pytorch_with_attention_mask():
    model = make_model()
    ids = random_ids(2, (2, 10))
    mask = jnp.asarray([[0, 0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 10], jnp.int32)
    ours = np.asarray(model(ids, mask))
    ref = torch_logits(model, ids, mask)
    real = np.asarray(mask, bool)
    np.testing.assert_allclose(ours[real], ref[real], rtol=1e-5, atol=1e-5)


def test_attention_is_bidirectional():
    model = make_model()
    ids = random_ids(3, (1, 9))
    changed = ids.at[0, -1].set((ids[0, -1] + 1) % 500)
    first, second = model(ids), model(changed)
    assert not np.allclose(first[0, 0], second[0, 0], atol=1e-6), "the last token must influence position 0"


def test_left_padding_invariance():
    model = make_model()
    real = random_ids(4, (1, 6))
    pad = 3
    padded = jnp.concatenate([jnp.full((1, pad), 7, jnp.int32), real], axis=1)
    mask = jnp.concatenate([jnp.zeros((1, pad), jnp.int32), jnp.ones((1, 6), jnp.int32)], axis=1)
    alone = model(real)
    with_padding = model(padded, mask)
    np.testing.assert_allclose(with_padding[:, pad:], alone, rtol=1e-5, atol=1e-5)
    # the padding's content does not matter either
    other = model(padded.at[:, :pad].set(123), mask)
    np.testing.assert_allclose(other[:, pad:], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 2e-2)])
@pytest.mark.parametrize("queries", [7, 5])  # 5: a window of queries against 7 keys (the cached samplers)
def test_attention_and_its_gradients_match_jax_reference(dtype, tol, queries):
    """The model's attention (heads-major layout, flash-attention form of the backward pass) against autodiff
    of jax.nn.dot_product_attention, with grouped-query heads, masked keys (a fully masked row included) and
    query-key pair masks: causal [L, S] (queries at positions 2 .. 6 for a window), and random per-row
    [B, L, S] ones (rows with no visible key included)."""
    from llada_jax.model import visible_pairs
    from llada_jax.model.attention import attention

    keys = jax.random.split(jax.random.key(0), 5)
    q = jax.random.normal(keys[0], (2, queries, 4, 8), dtype)
    k, v = (jax.random.normal(kk, (2, 7, 2, 8), dtype) for kk in keys[1:3])
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    key_mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [0] * 7], bool)
    causal = visible_pairs("causal", jnp.arange(7 - queries, 7), 7)  # [L, S]
    np.testing.assert_array_equal(causal, np.arange(7)[None, :] <= np.arange(7 - queries, 7)[:, None])
    random_pairs = jax.random.bernoulli(keys[4], 0.4, (2, queries, 7)).at[0, 1].set(False)  # [B, L, S]

    def reference(q, k, v, mask, pairs):
        rep = q.shape[2] // k.shape[2]
        m = jnp.ones((2, 1, queries, 7), bool)
        if mask is not None:
            m = m & mask[:, None, None, :]
        if pairs is not None:
            m = m & jnp.broadcast_to(pairs, (2, queries, 7))[:, None]
        return jax.nn.dot_product_attention(q, jnp.repeat(k, rep, 2), jnp.repeat(v, rep, 2), mask=m,
                                            implementation="xla")

    for mask, pairs in ((None, None), (key_mask, None), (None, causal), (key_mask, causal), (None, random_pairs),
                        (key_mask, random_pairs)):
        ours, ours_vjp = jax.vjp(lambda q, k, v, m=mask, p=pairs: attention(q, k, v, m, "xla", p), q, k, v)
        ref, ref_vjp = jax.vjp(lambda q, k, v, m=mask, p=pairs: reference(q, k, v, m, p), q, k, v)
        assert ours.dtype == ref.dtype == jnp.dtype(dtype)
        np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)
        for a, b in zip(ours_vjp(d_out), ref_vjp(d_out)):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


# --- model types of converted autoregressive models: causal attention, q/k/v biases, shifted logits -----------


def copy_params(source, target):
    """`target` with every parameter of `source` (models of the same shapes, other attention or shift)."""
    nnx.update(target, nnx.state(source, nnx.Param))
    return target


def test_causal_outputs_do_not_see_later_tokens():
    model = make_model(attention_type="causal", n_kv_heads=2)
    ids = random_ids(11, (2, 10))
    first = np.asarray(model(ids))
    for i in (1, 4, 9):
        changed = ids.at[:, i:].set((ids[:, i:] + 1 + jnp.arange(10 - i)) % 500)
        second = np.asarray(model(changed))
        np.testing.assert_array_equal(second[:, :i], first[:, :i])  # masked keys add exactly nothing
        assert np.abs(second[:, i:] - first[:, i:]).max() > 1e-3  # the changed positions themselves move


def test_causal_logits_are_the_logits_of_each_prefix_alone():
    ids = random_ids(12, (2, 9))
    # one layer: position i of the causal model is position i of the bidirectional model run on ids[:, :i + 1]
    # (with more layers the prefix's earlier positions would see i in the layers below)
    one = make_model(attention_type="causal", n_kv_heads=2, n_layers=1)
    one_bidirectional = copy_params(one, make_model(n_kv_heads=2, n_layers=1))
    got = np.asarray(one(ids))
    for i in range(9):
        np.testing.assert_allclose(got[:, i], np.asarray(one_bidirectional(ids[:, :i + 1]))[:, i], rtol=1e-5,
                                   atol=1e-5)
    assert np.abs(got - np.asarray(one_bidirectional(ids))).max() > 1e-3
    # any depth: the causal model on the prefix alone
    causal = make_model(attention_type="causal", n_kv_heads=2)
    bidirectional = copy_params(causal, make_model(n_kv_heads=2))
    got = np.asarray(causal(ids))
    for i in range(9):
        np.testing.assert_allclose(got[:, i], np.asarray(causal(ids[:, :i + 1]))[:, i], rtol=1e-5, atol=1e-5)
    # `visible` = tril on the bidirectional model, [L, L] or per row [B, L, L], is the causal model
    tril = jnp.tril(jnp.ones((9, 9), bool))
    np.testing.assert_allclose(np.asarray(bidirectional(ids, visible=tril)), got, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(bidirectional(ids, visible=jnp.stack([tril, tril]))), got, rtol=1e-6,
                               atol=1e-6)


def test_visible_restricts_each_row_separately():
    model = make_model()
    ids = random_ids(13, (2, 6))
    visible = jnp.stack([jnp.tril(jnp.ones((6, 6), bool)), jnp.ones((6, 6), bool)])  # row 0 causal, row 1 all
    got = np.asarray(model(ids, visible=visible))
    causal = copy_params(model, make_model(attention_type="causal"))
    np.testing.assert_allclose(got[0], np.asarray(causal(ids[:1]))[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], np.asarray(model(ids[1:]))[0], rtol=1e-5, atol=1e-5)


def set_random_biases(model, seed):
    for i, name in enumerate(("q_bias", "k_bias", "v_bias")):
        p = getattr(model.blocks, name)
        p[...] = 0.5 * jax.random.normal(jax.random.key(seed + i), p[...].shape)
    return model


@pytest.mark.parametrize("overrides", [
    dict(attention_type="causal"),
    dict(include_qkv_bias=True),
    dict(shift_logits=True),
    dict(attention_type="causal", include_qkv_bias=True, shift_logits=True, n_kv_heads=2),
    dict(attention_type="causal", shift_logits=True, scan_layers=False),
])
def test_model_types_match_the_pytorch_reference(overrides):
    model = make_model(**overrides)
    if model.config.include_qkv_bias:
        assert float(jnp.abs(model.blocks.q_bias[...]).max()) == 0.0  # initialised to zero: make them count
        set_random_biases(model, 20)
        without = copy_params(model, make_model(**{**overrides, "include_qkv_bias": False}))
        ids = random_ids(14, (1, 8))
        assert np.abs(np.asarray(model(ids)) - np.asarray(without(ids))).max() > 1e-2
    ids = random_ids(15, (2, 11))
    mask = jnp.asarray([[0, 0, 0] + [1] * 8, [1] * 11], jnp.int32)
    ours, ref = np.asarray(model(ids, mask)), torch_logits(model, ids, mask)
    real = np.asarray(mask, bool)
    if model.config.shift_logits:  # the first real token of a padded row reads the padding before it
        real[0, 3] = False
    np.testing.assert_allclose(ours[real], ref[real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model(ids)), torch_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_qkv_biases_are_added_to_the_projections():
    model = set_random_biases(make_model(include_qkv_bias=True, n_kv_heads=2, n_layers=1), 30)
    block = model.blocks
    x = jax.random.normal(jax.random.key(31), (2, 5, 64))
    q, k, v = nnx.vmap(lambda b, x: b.qkv(x), in_axes=(0, None))(block, x)
    h = np.asarray(rms_norm(x, block.attn_norm[...][0], 1e-5), np.float64)
    for got, name in zip((q[0], k[0], v[0]), "qkv"):
        w = np.asarray(getattr(block, f"{name}_proj")[...][0], np.float64)
        b = np.asarray(getattr(block, f"{name}_bias")[...][0], np.float64)
        np.testing.assert_allclose(np.asarray(got), np.einsum("bld,dnh->blnh", h, w) + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention_type", ["bidirectional", "causal"])
def test_shift_logits_are_the_unshifted_logits_moved_one_position_right(attention_type):
    plain = make_model(attention_type=attention_type)
    shifted = copy_params(plain, make_model(attention_type=attention_type, shift_logits=True))
    ids = random_ids(16, (2, 9))
    want, got = np.asarray(plain(ids)), np.asarray(shifted(ids))
    np.testing.assert_array_equal(got[:, 1:], want[:, :-1])  # position i predicted from the output at i - 1
    np.testing.assert_array_equal(got[:, 0], want[:, 0])  # position 0 from its own
    # hidden_states stay unshifted; prediction_states aligns them
    np.testing.assert_array_equal(np.asarray(shifted.hidden_states(ids)), np.asarray(plain.hidden_states(ids)))


def test_shift_logits_left_padding_invariance():
    model = make_model(shift_logits=True)
    real = random_ids(17, (1, 6))
    padded = jnp.concatenate([jnp.full((1, 3), 7, jnp.int32), real], axis=1)
    mask = jnp.asarray([[0, 0, 0] + [1] * 6], jnp.int32)
    np.testing.assert_allclose(np.asarray(model(padded, mask))[:, 3:], np.asarray(model(real)), rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_equals_mha_with_repeated_kv():
    gqa = make_model(n_kv_heads=2)
    mha = make_model(n_kv_heads=4)
    # copy every weight, with each kv head repeated for the 2 query heads of its group
    for name in ("attn_norm", "q_proj", "attn_out", "ff_norm", "ff_proj", "up_proj", "ff_out"):
        getattr(mha.blocks, name)[...] = getattr(gqa.blocks, name)[...]
    for name in ("k_proj", "v_proj"):
        getattr(mha.blocks, name)[...] = jnp.repeat(getattr(gqa.blocks, name)[...], 2, axis=2)
    mha.wte[...], mha.ln_f[...], mha.ff_out[...] = gqa.wte[...], gqa.ln_f[...], gqa.ff_out[...]
    ids = random_ids(5, (2, 8))
    np.testing.assert_allclose(gqa(ids), mha(ids), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gqa(ids)), torch_logits(gqa, ids), rtol=1e-5, atol=1e-5)


def test_weight_tying_uses_the_embedding_as_head():
    model = make_model(weight_tying=True)
    assert not hasattr(model, "ff_out")
    ids = random_ids(6, (1, 5))
    np.testing.assert_allclose(np.asarray(model(ids)), torch_logits(model, ids), rtol=1e-5, atol=1e-5)


def test_scanned_equals_unrolled():
    scanned = make_model(scan_layers=True, n_layers=3)
    unrolled = make_model(scan_layers=False, n_layers=3)
    for i, block in enumerate(unrolled.blocks):
        for name in ("attn_norm", "q_proj", "k_proj", "v_proj", "attn_out", "ff_norm", "ff_proj", "up_proj",
                     "ff_out"):
            getattr(block, name)[...] = getattr(scanned.blocks, name)[...][i]
    unrolled.wte[...], unrolled.ln_f[...], unrolled.ff_out[...] = scanned.wte[...], scanned.ln_f[...], scanned.ff_out[...]
    ids = random_ids(7, (2, 9))
    np.testing.assert_allclose(scanned(ids), unrolled(ids), rtol=1e-5, atol=1e-5)  # float reassociation only


@pytest.mark.parametrize("policy", ["full", "save_dots", "save_out_proj"])
def test_remat_policies_give_the_same_gradients(policy):
    ids = random_ids(8, (2, 6))

    def grads(model):
        def loss(m):
            return jnp.mean(m(ids) ** 2)

        return nnx.grad(loss)(model)

    base = grads(make_model())
    remat = grads(make_model(remat_policy=policy))
    for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(remat)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def matmul_operand_dtypes(model, ids) -> dict:
    """{operand dtype: number of dot_general equations} in the model's forward pass (scan bodies included)."""
    counts = {}

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                (dtype,) = {str(v.aval.dtype) for v in eqn.invars}
                counts[dtype] = counts.get(dtype, 0) + 1
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jax.make_jaxpr(model)(ids).jaxpr)
    return counts


def test_bf16_compute_stays_close_to_fp32():
    fp32 = make_model()
    bf16 = make_model(dtype="bfloat16")
    ids = random_ids(9, (2, 16))
    a, b = np.asarray(fp32(ids)), np.asarray(bf16(ids))
    assert bf16(ids).dtype == jnp.float32  # logits stay float32
    # the matmuls really run in bf16: every dot of the bf16 model (the scanned layer body's 7 projections and 2
    # attention products, then the head) takes bf16 operands, every dot of the fp32 model float32 ones
    assert matmul_operand_dtypes(bf16, ids) == {"bfloat16": 9 + 1}
    assert matmul_operand_dtypes(fp32, ids) == {"float32": 9 + 1}
    # stated tolerance: bf16 matmuls (8-bit mantissa) over 2 layers: max abs error < 0.07 on logits of
    # scale ~1, and the argmax agrees almost everywhere. (The max over these 2 x 16 x 512 logits is a noisy
    # statistic: over 8 random models and batches it spans 0.039-0.055, mean abs error 0.008; an earlier
    # 0.05 bound passed or failed with the seed.)
    assert np.max(np.abs(a - b)) < 0.07, np.max(np.abs(a - b))
    assert np.mean(a.argmax(-1) == b.argmax(-1)) > 0.9


def test_bf16_params_store_bf16():
    model = make_model(param_dtype="bfloat16", dtype="bfloat16")
    assert model.blocks.q_proj[...].dtype == jnp.bfloat16
    assert model(random_ids(0, (1, 4))).dtype == jnp.float32


# --- initialisation, sizes, metadata -----------------------------------------------------------------------


def test_official_initialisation_statistics():
    config = LLaDAConfig.tiny(d_model=256, n_heads=4, n_kv_heads=4, mlp_hidden_size=512, n_layers=3)
    model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(0))
    trunc = 0.9866  # std of a standard normal truncated at +-3 sigma
    d, m = 256, 512
    for i in range(3):
        depth = 1 / np.sqrt(2 * (i + 1))
        for name, std in [("q_proj", d**-0.5), ("k_proj", d**-0.5), ("v_proj", d**-0.5), ("ff_proj", d**-0.5),
                          ("up_proj", d**-0.5), ("attn_out", d**-0.5 * depth), ("ff_out", m**-0.5 * depth)]:
            w = np.asarray(getattr(model.blocks, name)[...][i])
            assert abs(w.std() / (std * trunc) - 1) < 0.03, (name, i, w.std(), std)
            assert np.abs(w).max() <= 3 * std * 1.0001, (name, i)
        np.testing.assert_array_equal(model.blocks.attn_norm[...][i], 1.0)
    assert abs(np.asarray(model.wte[...]).std() / (d**-0.5 * trunc) - 1) < 0.03
    assert abs(np.asarray(model.ff_out[...]).std() / (d**-0.5 * trunc) - 1) < 0.03


def test_llada_8b_parameter_count_without_allocation():
    assert count_params(LLaDAConfig.llada_8b()) == 8_015_581_184
    assert count_params(LLaDAConfig.llada_8b(scan_layers=False)) == 8_015_581_184


def test_every_parameter_has_logical_axes_of_its_rank():
    for scan in (True, False):
        model = make_model(scan_layers=scan, n_kv_heads=2)
        for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            axes = var.get_metadata()["out_sharding"]
            assert len(axes) == var[...].ndim, (path, axes)
            if scan and path[0] == "blocks":
                assert axes[0] == "layers"


def test_sharded_forward_equals_single_device():
    assert jax.device_count() == 8
    model = make_model(n_kv_heads=2)
    ids = random_ids(10, (4, 8))
    expected = model(ids)
    mesh = jax.make_mesh((2, 2, 1, 2), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    graphdef, state = nnx.split(model)
    shardings = sharding.state_shardings(state, mesh, sharding.current_rules())
    state = jax.device_put(state, shardings)
    assert state["blocks"]["ff_proj"][...].sharding.spec == jax.P(None, "fsdp", "tensor")

    @jax.jit
    def forward(state, ids):
        return nnx.merge(graphdef, state)(ids)

    with jax.set_mesh(mesh):
        out = forward(state, jax.device_put(ids, jax.NamedSharding(mesh, jax.P(("data", "fsdp")))))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LLaDAConfig.tiny(n_kv_heads=3)
    with pytest.raises(ValueError, match="mask_token_id"):
        LLaDAConfig.tiny(mask_token_id=4096)
    with pytest.raises(ValueError, match="remat_policy"):
        LLaDAConfig.tiny(remat_policy="sometimes")
    with pytest.raises(ValueError, match="unknown LLaDAConfig field"):
        LLaDAConfig.from_dict({"d_model": 8, "n_layer": 2})


def test_cudnn_path_passes_a_full_extent_mask_and_falls_back_with_a_warning(monkeypatch, caplog):
    """cuDNN needs no GPU to check what this project hands it: the key mask as a [B, 1, L, S] boolean (cuDNN turns
    a mask into a bias and requires its last two dims to be the query and key lengths), and on an unsupported
    case the XLA attention with a logged warning instead of a silent switch."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention

    from llada_jax.model import attention as attention_lib  # the module (the package does not export the function)

    q = jax.random.normal(jax.random.key(0), (2, 5, 4, 8), jnp.bfloat16)
    k = v = jax.random.normal(jax.random.key(1), (2, 7, 2, 8), jnp.bfloat16)
    key_mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]], bool)
    seen = {}

    def fake_cudnn(q, k, v, mask=None, implementation=None):
        assert implementation == "cudnn"
        seen["mask"] = mask
        bias = cudnn_attention.combine_bias_and_mask(None, mask, q.dtype)  # jax's own checks of the bias shape
        cudnn_attention.check_layout(q, k, v, bias, None, None, None, None, None, None,
                                     cudnn_attention.AttentionLayout.BTNH)
        raise RuntimeError("cuDNN is not detected.")

    monkeypatch.setattr(jax.nn, "dot_product_attention", fake_cudnn)
    # a command run earlier in this process (distributed.start) gives the package logger its own handler, and a
    # library's logging.config call may have disabled existing loggers: make caplog see this one
    logger = logging.getLogger("llada_jax")
    monkeypatch.setattr(logger, "propagate", True)
    monkeypatch.setattr(logger, "disabled", False)
    attention_lib._warn_cudnn_fallback_once.cache_clear()
    with caplog.at_level("WARNING", logger="llada_jax"):
        out = attention_lib.attention(q, k, v, key_mask, "cudnn")
    assert seen["mask"].shape == (2, 1, 5, 7) and seen["mask"].dtype == jnp.bool_
    np.testing.assert_array_equal(np.asarray(seen["mask"]), np.broadcast_to(key_mask[:, None, None, :], (2, 1, 5, 7)))
    assert "cuDNN attention unavailable" in caplog.text and "cuDNN is not detected" in caplog.text
    np.testing.assert_array_equal(np.asarray(out), np.asarray(attention_lib.attention(q, k, v, key_mask, "xla")))


@pytest.mark.parametrize("anchor", [0, 3])
def test_block_causal_outputs_do_not_depend_on_later_blocks(anchor):
    """A block-causal model: the outputs of blocks < b do not change when tokens of block b or later change (blocks
    of 4 laid from `anchor`), and a left-padded row gives the unpadded row's outputs when the anchor moves with it."""
    from flax import nnx

    model = LLaDAForMaskedLM(LLaDAConfig.tiny(attention_type="block_causal", block_size=4), rngs=nnx.Rngs(5))
    rs = np.random.RandomState(anchor)
    ids = jnp.asarray(rs.randint(0, 500, (2, 15)))
    base = np.asarray(model(ids, block_anchor=anchor))
    for first in range(anchor, 15, 4):  # change everything from the block starting at `first`
        changed = ids.at[:, first:].set(jnp.asarray(rs.randint(0, 500, (2, 15 - first))))
        out = np.asarray(model(changed, block_anchor=anchor))
        np.testing.assert_array_equal(out[:, :first], base[:, :first])
        assert np.abs(out[:, first:] - base[:, first:]).max() > 1e-3
    # left padding by 2 with the anchor moved by 2: the same outputs on the real tokens
    padded = jnp.concatenate([jnp.full((2, 2), 510), ids], axis=1)
    mask = jnp.concatenate([jnp.zeros((2, 2), jnp.int32), jnp.ones((2, 15), jnp.int32)], axis=1)
    got = np.asarray(model(padded, mask, block_anchor=anchor + 2))[:, 2:]
    np.testing.assert_allclose(got, base, atol=2e-5, rtol=2e-5)
