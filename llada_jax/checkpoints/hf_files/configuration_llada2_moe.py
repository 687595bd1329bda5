"""LLaDA 2.x (Mixture-of-Experts) configuration for transformers (`trust_remote_code=True`), written for llada-jax.

Reads the config.json of inclusionAI's LLaDA2.0 models (model_type "llada2_moe", the usual transformers field
names) and gives every field the meaning the published model gives it; the defaults are LLaDA2.0-mini's. The
network: `first_k_dense_replace` dense SwiGLU layers (`intermediate_size` wide), then Mixture-of-Experts layers
of `num_experts` SwiGLU experts (`moe_intermediate_size` wide) of which a router picks `num_experts_per_tok`
per token, plus `num_shared_experts` always used; grouped-query attention over heads of `head_dim` with an
RMSNorm on each query and key head (`use_qk_norm`) and rotary embeddings on the first `rotary_dim` dimensions of
a head (head_dim * partial_rotary_factor unless given).

The router: `score_function` "sigmoid" (or "softmax") of the float32 logits; with `moe_router_enable_expert_bias`
a learned bias is added to the scores for the choice only; the experts fall in `n_group` groups, each scored by
the sum of its two best biased scores, and the choice is made inside the best `topk_group` groups; the chosen
experts' unbiased scores are the weights, normalised to sum 1 when `norm_topk_prob`, times
`routed_scaling_factor`.

`rope_scaling` is the published field and stays a plain field here (None: no scaling, the only kind the
modeling file implements), rather than transformers 5's deprecated alias of `rope_parameters`. Fields this
implementation does not use (dropouts, multi-token-prediction settings, ...) are kept as given.
"""

from transformers import PretrainedConfig


class LLaDA2MoeConfig(PretrainedConfig):
    model_type = "llada2_moe"
    keys_to_ignore_at_inference = ["past_key_values"]
    # A plain field shadowing PretrainedConfig's `rope_scaling` property (transformers 5), whose setter warns and
    # stores the value as `rope_parameters`: config.json keeps the published `"rope_scaling": null`.
    rope_scaling = None

    def __init__(
        self,
        vocab_size=157184,
        hidden_size=2048,
        intermediate_size=5120,
        moe_intermediate_size=512,
        num_hidden_layers=20,
        num_attention_heads=16,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=256,
        num_shared_experts=1,
        num_experts_per_tok=8,
        n_group=8,
        topk_group=4,
        routed_scaling_factor=2.5,
        score_function="sigmoid",
        norm_topk_prob=True,
        moe_router_enable_expert_bias=True,
        router_dtype="fp32",
        first_k_dense_replace=1,
        partial_rotary_factor=0.5,
        rotary_dim=None,
        rope_theta=600000.0,
        rope_scaling=None,
        rms_norm_eps=1e-6,
        max_position_embeddings=16384,
        initializer_range=0.02,
        tie_word_embeddings=False,
        use_bias=False,
        use_qkv_bias=False,
        use_qk_norm=True,
        hidden_act="silu",
        pad_token_id=156892,
        eos_token_id=156892,
        mask_token_id=156895,
        use_cache=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads if head_dim is None else head_dim
        self.num_experts = num_experts
        self.num_shared_experts = num_shared_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.n_group = n_group
        self.topk_group = topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.score_function = score_function
        self.norm_topk_prob = norm_topk_prob
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.router_dtype = router_dtype
        self.first_k_dense_replace = first_k_dense_replace
        self.partial_rotary_factor = partial_rotary_factor
        self.rotary_dim = int(self.head_dim * partial_rotary_factor) if rotary_dim is None else rotary_dim
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.rms_norm_eps = rms_norm_eps
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.use_bias = use_bias
        self.use_qkv_bias = use_qkv_bias
        self.use_qk_norm = use_qk_norm
        self.hidden_act = hidden_act
        self.mask_token_id = mask_token_id
        self.use_cache = use_cache
        kwargs.setdefault("architectures", ["LLaDA2MoeModelLM"])
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    def is_moe_layer(self, layer_id: int) -> bool:
        """Whether layer `layer_id` (0-based) has a Mixture-of-Experts MLP (else a dense SwiGLU)."""
        return self.num_experts > 0 and layer_id >= self.first_k_dense_replace
