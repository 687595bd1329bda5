"""LoRA adapters in the model (llada_jax.lora on nnx.LoRA): a new adapter changes nothing, the adapted projection
is x W + alpha / rank x A B (checked against numpy), merging agrees with the adapters, dropout only in training,
the parameters' shapes and sharding names, and the settings' errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import sharding
from llada_jax.config import LORA_TARGETS, LLaDAConfig, LoRAConfig, lora_config_from, train_config
from llada_jax.model import LLaDAForMaskedLM, count_params

CONFIGS = {
    "scanned": LLaDAConfig.tiny(),
    "unrolled, GQA, q/k/v biases": LLaDAConfig.tiny(scan_layers=False, n_kv_heads=2, include_qkv_bias=True),
}


def ids(batch=2, length=24, seed=1):
    return jax.random.randint(jax.random.key(seed), (batch, length), 0, 509)


def randomised(model, scale=0.05, seed=3):
    """The model with every adapter matrix (B included: it starts at zero) drawn at random."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(model, jax.tree.unflatten(tree, [scale * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]))
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
def test_new_adapters_leave_the_logits_exactly_unchanged(name):
    config = CONFIGS[name]
    base = LLaDAForMaskedLM(config, rngs=nnx.Rngs(0))
    adapted = LLaDAForMaskedLM(config, rngs=nnx.Rngs(0), lora=LoRAConfig(rank=4))
    # the base parameters are drawn as without adapters (the adapters' draws come after them)
    base_params = nnx.to_pure_dict(nnx.state(base, nnx.Param))
    frozen = nnx.to_pure_dict(nnx.state(adapted, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))))
    for a, b in zip(jax.tree.leaves(base_params), jax.tree.leaves(frozen)):
        np.testing.assert_array_equal(a, b)
    x = ids()
    np.testing.assert_array_equal(base(x), adapted(x))  # B = 0: exactly, not approximately
    keys = jax.random.split(jax.random.key(4), 2)
    np.testing.assert_array_equal(base(x), adapted(x, dropout_keys=keys))  # dropout of a zero term is zero
    randomised(adapted)
    assert float(jnp.max(jnp.abs(adapted(x) - base(x)))) > 1e-2  # the adapters do act


def test_adapted_projection_equals_the_numpy_formula():
    """One block's q_proj and attn_out through the model's `project` against x W + alpha / rank x A B in numpy."""
    config = LLaDAConfig.tiny(scan_layers=False)
    lora = LoRAConfig(rank=3, alpha=7.0, targets=("q_proj", "attn_out"))
    model = randomised(LLaDAForMaskedLM(config, rngs=nnx.Rngs(0), lora=lora))
    block = model.blocks[1]
    x = np.asarray(jax.random.normal(jax.random.key(5), (2, 5, config.d_model)))
    w = np.asarray(block.q_proj[...]).reshape(config.d_model, -1)
    a, b = (np.asarray(getattr(block.adapters["q_proj"], k)[...], np.float64) for k in ("lora_a", "lora_b"))
    expected = (x @ w + 7.0 / 3 * (x @ a @ b)).reshape(2, 5, config.n_heads, config.head_dim)
    np.testing.assert_allclose(block.project("q_proj", jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)
    heads = np.asarray(jax.random.normal(jax.random.key(6), (2, 5, config.n_heads, config.head_dim)))
    flat = heads.reshape(2, 5, -1)  # the flattened head dimension is heads-major, as W's rows
    w = np.asarray(block.attn_out[...]).reshape(-1, config.d_model)
    a, b = (np.asarray(getattr(block.adapters["attn_out"], k)[...], np.float64) for k in ("lora_a", "lora_b"))
    np.testing.assert_allclose(block.project("attn_out", jnp.asarray(heads), 2), flat @ w + 7.0 / 3 * (flat @ a @ b),
                               rtol=1e-5, atol=1e-5)
    # an untargeted projection is the plain matmul
    np.testing.assert_allclose(block.project("ff_proj", jnp.asarray(x)), x @ np.asarray(block.ff_proj[...]),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_merged_model_agrees_with_the_adapters(name):
    config = CONFIGS[name]
    model = randomised(LLaDAForMaskedLM(config, rngs=nnx.Rngs(0), lora=LoRAConfig(rank=4)))
    merged = model.merge_lora()
    assert merged.lora is None and not nnx.state(merged, nnx.LoRAParam)
    x = ids()
    unmerged_logits = model(x)
    np.testing.assert_allclose(merged(x), unmerged_logits, rtol=1e-4, atol=1e-4)
    # merged weights in the base's dtype: a bfloat16 base stays bfloat16
    bf16 = randomised(LLaDAForMaskedLM(config.replace(param_dtype="bfloat16"), rngs=nnx.Rngs(0),
                                       lora=LoRAConfig(rank=4)))
    merged16 = bf16.merge_lora()
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(merged16, nnx.Param)))


def test_dropout_is_keyed_per_row_and_off_without_keys():
    config = LLaDAConfig.tiny()
    model = randomised(LLaDAForMaskedLM(config, rngs=nnx.Rngs(0), lora=LoRAConfig(rank=4, dropout=0.5)), scale=0.3)
    x = ids(batch=3)
    keys = jax.random.split(jax.random.key(8), 3)
    a, b = model(x, dropout_keys=keys), model(x, dropout_keys=keys)
    np.testing.assert_array_equal(a, b)  # the same keys, the same masks
    assert float(jnp.max(jnp.abs(a - model(x)))) > 1e-3  # dropout acts in training only
    # a row's output depends on its own key only: the first two rows alone give the same logits
    np.testing.assert_allclose(model(x[:2], dropout_keys=keys[:2]), a[:2], rtol=1e-4, atol=1e-4)


def test_adapter_shapes_count_and_sharding_names():
    config = LLaDAConfig.tiny(n_kv_heads=2)
    lora = LoRAConfig(rank=8)
    model = nnx.eval_shape(lambda: LLaDAForMaskedLM(config, rngs=nnx.Rngs(0), lora=lora))
    adapters = nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))["blocks"]["adapters"]
    d, m, hd = config.d_model, config.mlp_hidden_size, config.head_dim
    sizes = {"q_proj": (d, 4 * hd), "k_proj": (d, 2 * hd), "v_proj": (d, 2 * hd), "attn_out": (4 * hd, d),
             "ff_proj": (d, m), "up_proj": (d, m), "ff_out": (m, d)}
    for target, (n_in, n_out) in sizes.items():
        assert adapters[target]["lora_a"].shape == (config.n_layers, n_in, 8)
        assert adapters[target]["lora_b"].shape == (config.n_layers, 8, n_out)
        assert adapters[target]["lora_a"].dtype == jnp.float32
    n_adapter = sum(x.size for x in jax.tree.leaves(adapters))
    assert n_adapter == config.n_layers * 8 * sum(i + o for i, o in sizes.values())
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert total == count_params(config) + n_adapter
    axes = jax.tree.map(sharding.param_logical_axes, nnx.state(model, nnx.LoRAParam),
                        is_leaf=lambda v: isinstance(v, nnx.Variable))
    axes = nnx.to_pure_dict(axes)["blocks"]["adapters"]
    assert axes["q_proj"] == {"lora_a": ("layers", "embed", None), "lora_b": ("layers", None, "heads")}
    assert axes["ff_out"] == {"lora_a": ("layers", "mlp", None), "lora_b": ("layers", None, "embed")}


@pytest.mark.parametrize("field,value,message", [
    ("targets", "q_proj,lm_head", "lora.targets: unknown target 'lm_head'; expected some of q_proj, k_proj"),
    ("targets", "", "lora.targets: targets must be distinct and not empty"),
    ("rank", 0, "lora.rank: expected a positive integer, got 0"),
    ("rank", -4, "lora.rank: expected a positive integer, got -4"),
    ("alpha", 0.0, "lora.alpha: expected a positive number"),
    ("dropout", 1.0, "lora.dropout: expected a probability in [0, 1)"),
])
def test_bad_settings_name_the_field(field, value, message):
    c = train_config()
    c.lora.enabled = True
    c.lora[field] = value
    with pytest.raises(ValueError) as e:
        lora_config_from(c)
    assert str(e.value).startswith(message)


def test_the_training_config_group_maps_to_the_lora_config():
    c = train_config()
    assert lora_config_from(c) is None  # off by default
    c.lora.enabled = True
    assert lora_config_from(c) == LoRAConfig(targets=LORA_TARGETS)  # default: attention and MLP projections
    c.lora.targets = "q_proj, v_proj"
    assert lora_config_from(c).targets == ("q_proj", "v_proj")
    assert LoRAConfig(rank=16, alpha=32.0).scale == 2.0


def test_save_pretrained_of_an_adapted_model_writes_it_merged(tmp_path):
    model = randomised(LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0), lora=LoRAConfig(rank=4)))
    path = model.save_pretrained(str(tmp_path / "hf"))
    x = ids()
    np.testing.assert_allclose(LLaDAForMaskedLM.from_pretrained(path)(x), model(x), rtol=1e-4, atol=1e-4)


def test_a_lora_config_given_a_list_of_targets_is_hashable():
    """The config is part of the model's graphdef, a static argument of jitted samplers."""
    lora = LoRAConfig(targets=["q_proj", "v_proj"])
    assert lora.targets == ("q_proj", "v_proj")
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: LLaDAForMaskedLM(LLaDAConfig.tiny(), rngs=nnx.Rngs(0), lora=lora)))
    hash(graphdef)
