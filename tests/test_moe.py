"""The Mixture-of-Experts network (LLaDA 2.x, LLaDA-MoE) against the independent references of
`tests/moe_reference.py`: the router's choices (ties included), the dropless grouped computation against a dense
loop over the experts (forward and gradients), whole-model logits, and expert parallelism on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from llada_jax import sharding
from llada_jax.config import LLaDAConfig
from llada_jax.model import DENSE_BLOCKS, LLaDAForMaskedLM, count_active_params, count_params, layer_stacks
from llada_jax.model import moe
from tests import moe_reference as ref


def our_config(cfg: dict, **overrides) -> LLaDAConfig:
    """The LLaDAConfig of a reference config.json (either family), written here from the field names."""
    llada2 = cfg["model_type"].startswith("llada2")
    n_experts = cfg["num_experts"]
    fields = dict(
        d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"], n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg["num_key_value_heads"], vocab_size=cfg["vocab_size"],
        max_sequence_length=cfg["max_position_embeddings"], rope_theta=float(cfg["rope_theta"]),
        rms_norm_eps=cfg["rms_norm_eps"], qk_norm=True, partial_rotary_factor=cfg.get("partial_rotary_factor", 1.0),
        mask_token_id=cfg["mask_token_id"], eos_token_id=cfg["eos_token_id"], pad_token_id=cfg["pad_token_id"],
        bos_token_id=None, num_experts=n_experts, experts_per_token=cfg["num_experts_per_tok"],
        router_norm_topk=bool(cfg.get("norm_topk_prob")), router_scale=float(cfg.get("routed_scaling_factor", 1)),
    )
    if llada2:
        fields.update(mlp_hidden_size=cfg["intermediate_size"], expert_hidden_size=cfg["moe_intermediate_size"],
                      num_shared_experts=cfg["num_shared_experts"], first_dense_layers=cfg["first_k_dense_replace"],
                      router_score=cfg["score_function"], router_expert_bias=cfg["moe_router_enable_expert_bias"],
                      router_groups=cfg["n_group"], router_topk_groups=cfg["topk_group"])
    else:
        fields.update(mlp_hidden_size=cfg["dense_intermediate_size"],
                      expert_hidden_size=cfg["expert_intermediate_size"], router_score=cfg["moe_router_score_function"])
    return LLaDAConfig(**{**fields, **overrides})


def our_params(weights: dict, cfg: dict, config: LLaDAConfig) -> dict:
    """The reference's HF-named weights as this project's scanned parameter tree (Linear [out, in] -> [in, out],
    heads split out, experts stacked), written here independently of the checkpoint layer."""
    w = ref.merged_to_per_expert(weights)
    llada2 = cfg["model_type"].startswith("llada2")
    d, n, k, hd = config.d_model, config.n_heads, config.effective_n_kv_heads, config.head_dim

    def layer(i: int) -> dict:
        p = f"model.layers.{i}."
        if llada2:
            qkv = w[p + "attention.query_key_value.weight"]
            q, kk, v = qkv[: n * hd], qkv[n * hd: (n + k) * hd], qkv[(n + k) * hd:]
            out, qn, kn = (w[p + "attention." + s] for s in ("dense.weight", "query_layernorm.weight",
                                                             "key_layernorm.weight"))
        else:
            q, kk, v, out = (w[p + f"self_attn.{s}_proj.weight"] for s in "qkvo")
            qn, kn = w[p + "self_attn.q_norm.weight"], w[p + "self_attn.k_norm.weight"]
        block = {"attn_norm": w[p + "input_layernorm.weight"], "q_proj": q.T.reshape(d, n, hd),
                 "k_proj": kk.T.reshape(d, k, hd), "v_proj": v.T.reshape(d, k, hd), "q_norm": qn, "k_norm": kn,
                 "attn_out": out.T.reshape(n, hd, d), "ff_norm": w[p + "post_attention_layernorm.weight"]}
        if not config.is_moe_layer(i):
            block.update(ff_proj=w[p + "mlp.gate_proj.weight"].T, up_proj=w[p + "mlp.up_proj.weight"].T,
                         ff_out=w[p + "mlp.down_proj.weight"].T)
            return block
        experts = [f"{p}mlp.experts.{e}." for e in range(config.num_experts)]
        mlp = {"router": w[p + "mlp.gate.weight"].T,
               "gate": np.stack([w[e + "gate_proj.weight"].T for e in experts]),
               "up": np.stack([w[e + "up_proj.weight"].T for e in experts]),
               "down": np.stack([w[e + "down_proj.weight"].T for e in experts])}
        if config.router_expert_bias:
            mlp["expert_bias"] = w[p + "mlp.gate.expert_bias"]
        if config.num_shared_experts:
            s = p + "mlp.shared_experts."
            mlp.update(shared_gate=w[s + "gate_proj.weight"].T, shared_up=w[s + "up_proj.weight"].T,
                       shared_down=w[s + "down_proj.weight"].T)
        block["mlp"] = mlp
        return block

    embed = "model.word_embeddings.weight" if llada2 else "model.embed_tokens.weight"
    params = {"wte": w[embed], "ln_f": w["model.norm.weight"], "ff_out": w["lm_head.weight"].T}
    for name, (first, count) in layer_stacks(config).items():
        layers = [layer(i) for i in range(first, first + count)]
        params[name] = jax.tree.map(lambda *a: np.stack(a), *layers)
    return params


def load(config: LLaDAConfig, params: dict) -> LLaDAForMaskedLM:
    model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    nnx.update(model, state)
    return model


@pytest.fixture(scope="module")
def llada2():
    cfg = ref.tiny_llada2_config()
    weights = ref.random_weights(cfg, seed=1)
    config = our_config(cfg)
    return cfg, weights, config, load(config, our_params(weights, cfg, config))


# ----------------------------------------------------------------------------------------------------- router

@pytest.mark.parametrize("family", ["llada2", "llada_moe"])
def test_router_choices_and_weights_equal_the_numpy_reference_ties_included(family):
    cfg = ref.tiny_llada2_config() if family == "llada2" else ref.tiny_llada_moe_config()
    config = our_config(cfg)
    rng = np.random.RandomState(0)
    # logits on a coarse grid: many exact ties between experts and between groups
    logits = (rng.randint(-4, 5, (256, cfg["num_experts"])) / 4).astype(np.float32)
    bias = (rng.randint(-2, 3, cfg["num_experts"]) / 8).astype(np.float32) if config.router_expert_bias else None
    chosen, weights = moe.route(jnp.asarray(logits), config, None if bias is None else jnp.asarray(bias))
    want_chosen, want_weights = ref.route(logits, cfg, bias)
    np.testing.assert_array_equal(np.asarray(chosen), want_chosen)
    np.testing.assert_allclose(np.asarray(weights), want_weights, rtol=1e-6)
    if config.router_norm_topk:
        np.testing.assert_allclose(np.asarray(weights).sum(-1), config.router_scale, rtol=1e-6)


def test_the_expert_bias_changes_the_choice_not_the_weights():
    config = our_config(ref.tiny_llada2_config(), router_groups=1, router_topk_groups=1, router_norm_topk=False,
                        router_scale=1.0)
    logits = jnp.zeros((1, 8)).at[0, 3].set(1.0)  # expert 3 best, the rest tied
    bias = jnp.zeros(8).at[6].set(2.0).at[5].set(1.5)
    chosen, weights = moe.route(logits, config, bias)
    assert chosen.tolist() == [[6, 5]]  # by biased score
    np.testing.assert_allclose(weights, [[0.5, 0.5]])  # the unbiased sigmoid(0)


# ----------------------------------------------------------------------------------------------------- dropless

def dense_loop(x, chosen, weights, gate, up, down):
    """Every expert over every token, masked by the choice: the plain form the grouped computation must equal."""
    out = jnp.zeros(x.shape, jnp.float32)
    for e in range(gate.shape[0]):
        y = (jax.nn.silu(x @ gate[e]) * (x @ up[e])) @ down[e]
        w = jnp.sum(jnp.where(chosen == e, weights, 0.0), axis=-1)
        out = out + w[..., None] * y.astype(jnp.float32)
    return out.astype(x.dtype)


def expert_inputs(seed=0, b=2, length=8, d=16, e=8, f=12, k=2, unused=None):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(b, length, d), jnp.float32)
    scores = rng.rand(b, length, e)
    if unused is not None:
        scores[..., unused] = -1.0  # never among the top k
    chosen = jnp.asarray(np.argsort(-scores, axis=-1)[..., :k], jnp.int32)
    weights = jnp.asarray(rng.rand(b, length, k), jnp.float32)
    mats = [jnp.asarray(rng.randn(*s) * 0.3, jnp.float32) for s in ((e, d, f), (e, d, f), (e, f, d))]
    return x, chosen, weights, mats


def test_dropless_grouped_experts_equal_a_dense_loop_forward_and_gradients():
    x, chosen, weights, mats = expert_inputs(unused=5)
    np.testing.assert_allclose(moe.routed_experts(x, chosen, weights, *mats),
                               dense_loop(x, chosen, weights, *mats), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, w, g, u, d: jnp.sum(jnp.sin(fn(x, chosen, w, g, u, d)))

    grads = jax.grad(loss(moe.routed_experts), argnums=(0, 1, 2, 3, 4))(x, weights, *mats)
    want = jax.grad(loss(dense_loop), argnums=(0, 1, 2, 3, 4))(x, weights, *mats)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
    for mat in grads[2:]:  # expert 5 got no token: zero gradient, exactly
        assert not np.any(np.asarray(mat[5])) and np.any(np.asarray(mat[4]))


# ----------------------------------------------------------------------------------------------------- network

def test_llada2_logits_equal_the_pytorch_reference(llada2):
    cfg, weights, config, model = llada2
    ids = np.random.RandomState(2).randint(0, cfg["vocab_size"], (2, 12))
    mask = np.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    got = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    want = ref.llada2_logits(weights, cfg, ids, mask)
    real = mask.astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_llada2_block_causal_logits_equal_the_reference(llada2):
    cfg, weights, config, _ = llada2
    config = config.replace(attention_type="block_causal", block_size=4)
    model = load(config, our_params(weights, cfg, config))
    ids = np.random.RandomState(3).randint(0, cfg["vocab_size"], (1, 12))
    want = ref.llada2_logits(weights, cfg, ids, visible=ref.block_causal_visible(12, 4))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_dFactory_merged_layout_gives_the_same_model(llada2):
    cfg, weights, config, model = llada2
    merged = ref.random_weights(cfg, seed=1, layout="merged")
    ids = jnp.asarray(np.random.RandomState(4).randint(0, cfg["vocab_size"], (1, 8)))
    np.testing.assert_array_equal(load(config, our_params(merged, cfg, config))(ids), model(ids))


def test_llada_moe_logits_equal_the_pytorch_reference():
    cfg = ref.tiny_llada_moe_config()
    weights = ref.random_weights(cfg, seed=5)
    config = our_config(cfg)
    assert config.n_moe_layers == config.n_layers and DENSE_BLOCKS not in layer_stacks(config)
    model = load(config, our_params(weights, cfg, config))
    ids = np.random.RandomState(6).randint(0, cfg["vocab_size"], (2, 10))
    want = ref.llada_moe_logits(weights, cfg, ids)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids))), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_unrolled_layers_equal_the_scanned_ones_and_report_the_expert_load(llada2):
    cfg, weights, config, model = llada2
    ids = jnp.asarray(np.random.RandomState(7).randint(0, cfg["vocab_size"], (2, 8)))
    unrolled = LLaDAForMaskedLM(config.replace(scan_layers=False), rngs=nnx.Rngs(0))
    params = our_params(weights, cfg, config)
    stacked = {name: params.pop(name) for name in layer_stacks(config)}
    blocks = {}
    for name, (first, count) in layer_stacks(config).items():
        for j in range(count):
            blocks[first + j] = jax.tree.map(lambda a: a[j], stacked[name])
    state = nnx.state(unrolled, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, {**params, "blocks": blocks}))
    nnx.update(unrolled, state)
    np.testing.assert_allclose(unrolled(ids), model(ids), rtol=1e-5, atol=1e-5)
    logits, stats = model.expert_load(ids)
    load_ = stats.load
    np.testing.assert_array_equal(logits, model(ids))
    assert load_.shape == (config.n_moe_layers, config.num_experts)
    np.testing.assert_array_equal(load_.sum(-1), 2 * 8 * config.experts_per_token)  # every pair counted once


def test_the_expert_load_counts_real_tokens_only(llada2):
    """With an attention mask the load counts the (token, expert) pairs of the real tokens: a left-padded row's
    are those of the same tokens unpadded (its positions and attention are the same), its padding routes nothing."""
    cfg, _, config, model = llada2
    ids = jnp.asarray(np.random.RandomState(9).randint(0, cfg["vocab_size"], (2, 10)))
    mask = jnp.asarray([[1] * 10, [0] * 4 + [1] * 6])
    _, stats = model.hidden_states_and_load(ids, mask)
    np.testing.assert_array_equal(stats.load.sum(-1), 16 * config.experts_per_token)
    np.testing.assert_allclose(stats.score_sum.sum(-1), 16, rtol=1e-5)  # each token's scores sum to 1
    alone = [model.hidden_states_and_load(row)[1] for row in (ids[:1], ids[1:, 4:])]
    for got, *rows in zip(stats, *alone):
        np.testing.assert_allclose(got, rows[0] + rows[1], rtol=1e-5, atol=1e-5)


def test_presets_have_the_published_sizes():
    mini, flash = LLaDAConfig.llada2_mini(), LLaDAConfig.llada2_flash()
    assert round(count_params(mini) / 1e9, 2) == 16.26 and round(count_active_params(mini) / 1e9, 2) == 1.43
    assert round(count_params(flash) / 1e9) == 103 and round(count_active_params(flash) / 1e9, 1) == 6.2
    assert (mini.rotary_dim, mini.head_dim, mini.n_moe_layers) == (64, 128, 19)
    with pytest.raises(ValueError, match="router_groups"):
        LLaDAConfig.tiny_moe(router_groups=3)
    with pytest.raises(ValueError, match="expert_hidden_size.*Mixture-of-Experts models only"):
        LLaDAConfig.tiny(expert_hidden_size=8)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        LLaDAConfig.tiny(partial_rotary_factor=0.3)


# ----------------------------------------------------------------------------------------------------- meshes

@pytest.mark.parametrize("batch", [8, 1])  # tokens split over the expert axis (all_to_all); one row (psum)
def test_expert_parallel_mesh_equals_one_device_forward_and_gradients(llada2, batch):
    cfg, weights, config, model = llada2
    assert jax.device_count() == 8
    ids = jnp.asarray(np.random.RandomState(8).randint(0, cfg["vocab_size"], (batch, 8)))
    graphdef, state = nnx.split(model)

    def loss(state, ids):
        return jnp.mean(jnp.square(nnx.merge(graphdef, state)(ids)))

    want_loss, want_grads = jax.value_and_grad(loss)(state, ids)
    mesh = jax.make_mesh((2, 1, 4, 1), sharding.MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
    placed = jax.device_put(state, sharding.state_shardings(state, mesh, sharding.current_rules()))
    assert placed["blocks"]["mlp"]["gate"][...].sharding.spec[1] == "expert"  # [layers, E, d, f]
    rows = jax.P(("data", "expert")) if batch == 8 else jax.P()  # what the batch rule gives each batch
    with jax.set_mesh(mesh):
        placed_ids = jax.device_put(ids, jax.NamedSharding(mesh, rows))
        got_loss, got_grads = jax.jit(jax.value_and_grad(loss))(placed, placed_ids)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-5)
    for (path, got), (_, want) in zip(jax.tree_util.tree_leaves_with_path(got_grads),
                                      jax.tree_util.tree_leaves_with_path(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_model_info_prints_total_and_active_parameters(capsys):
    from llada_jax.cli import main

    assert main(["model-info", "--preset", "llada2_mini"]) == 0
    out = capsys.readouterr().out
    mini = LLaDAConfig.llada2_mini()
    assert f"{count_params(mini):,} parameters, {count_active_params(mini):,} active per token" in out
    assert "experts: 256 of 512, 8 per token, 1 shared, the first 1 layer(s) dense; router sigmoid, 8 group(s) " \
           "(4 kept), scale 2.5" in out


# ----------------------------------------------------------------------------------------------------- samplers

def test_block_diffusion_sampling_of_a_moe_model_equals_the_reference_with_and_without_the_cache():
    """The samplers run on a MoE model unchanged: block diffusion with the exact prefix cache gives the uncached
    tokens, and each row the step-by-step reference on its unpadded prompt (left padding changes nothing)."""
    from llada_jax import generate
    from tests.sampling_reference import reference_block_diffusion

    config = LLaDAConfig.tiny_moe(attention_type="block_causal", block_size=4)
    model = LLaDAForMaskedLM(config, rngs=nnx.Rngs(3))
    prompts = [[3, 17, 42, 99], [8, 1, 300, 65, 12, 77, 5]]
    width = 7
    ids = np.array([[config.pad_token_id] * (width - len(p)) + p for p in prompts], np.int32)
    mask = np.array([[0] * (width - len(p)) + [1] * len(p) for p in prompts], np.int32)
    outs = {cache: np.asarray(generate(model, ids, mask, method="block_diffusion", gen_length=8, steps=4,
                                       cache=cache)) for cache in ("none", "prefix")}
    np.testing.assert_array_equal(outs["prefix"], outs["none"])
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids, anchor: nnx.merge(graphdef, state)(ids, block_anchor=anchor))
    for row, prompt in enumerate(prompts):
        def logits(ids, _mask, anchor=len(prompt)):
            return np.asarray(forward(state, jnp.asarray(ids, jnp.int32), jnp.int32(anchor)))

        want, _ = reference_block_diffusion(logits, np.array([prompt]), steps=4, gen_length=8, block_size=4,
                                            mask_id=config.mask_token_id, eos_id=config.eos_token_id)
        np.testing.assert_array_equal(outs["prefix"][row, width - len(prompt):], want[0])


def test_sizing_grouped_matmuls_keeps_shapes_and_drops_the_dense_expansion():
    """`sized_as_grouped_matmul` (compile-check on CPU) traces the grouped matmuls as one matmul of the same operand
    and output shapes: the program's outputs keep their shapes, and its temporaries drop to the rows' buffers
    (XLA:CPU's ragged_dot expands every row against every expert), for a 16-expert layer well below half."""
    rows, d, f, e = 256, 64, 128, 16
    args = (jax.ShapeDtypeStruct((rows, d), jnp.float32), jax.ShapeDtypeStruct((e,), jnp.int32),
            jax.ShapeDtypeStruct((e, d, f), jnp.float32), jax.ShapeDtypeStruct((e, d, f), jnp.float32),
            jax.ShapeDtypeStruct((e, f, d), jnp.float32))
    step = jax.jit(jax.grad(lambda x, s, g, u, w: jnp.sum(moe.grouped_swiglu(x, s, g, u, w) ** 2), (0, 2)))
    native = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    jax.clear_caches()  # (the native trace would be reused inside the context)
    with moe.sized_as_grouped_matmul():
        lowered = step.lower(*args)
    assert not moe._SIZING[0] and jax.eval_shape(step, *args) == lowered.out_info
    again = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    assert again == native  # traced anew after the context: the sized trace is not reused
    sized = lowered.compile().memory_analysis().temp_size_in_bytes
    assert sized < 0.5 * native, (sized, native)
