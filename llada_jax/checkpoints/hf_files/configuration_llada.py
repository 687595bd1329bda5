"""LLaDA configuration for transformers (`trust_remote_code=True`), written for llada-jax exports.

Reads the official LLaDA config.json (OLMo-style field names: d_model, n_layers, n_heads, n_kv_heads,
mlp_hidden_size, ...) and gives every field the meaning the official configuration gives it, including the
official defaults for absent fields (an OLMo/GPT-2 model: sequential block, no rope, 50304 embeddings), so a
config.json describes the same network to the official code, to this code and to llada-jax. Exports write
every field. The usual transformers names (hidden_size, num_hidden_layers, num_attention_heads,
num_key_value_heads, intermediate_size, max_position_embeddings) are aliases of the official ones. Fields
this implementation does not use (dropouts, init_*, precision, flash_attention, ...) are kept as given.
Three fields are llada-jax's own, absent from official configs: `attention_type` ("bidirectional", LLaDA;
"causal", a model converted from an autoregressive checkpoint; or "block_causal", block diffusion, where a
position in block b sees every position of blocks <= b), `block_size` (the positions per block of a
"block_causal" model, None otherwise) and `shift_logits` (the logits for position i are the output at i - 1,
as in Dream).
"""

from transformers import PretrainedConfig


class LLaDAConfig(PretrainedConfig):
    model_type = "llada"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads",
        "intermediate_size": "mlp_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    def __init__(
        self,
        d_model=768,
        n_layers=12,
        n_heads=12,
        n_kv_heads=None,
        mlp_hidden_size=None,
        mlp_ratio=4,
        vocab_size=50257,
        embedding_size=50304,
        max_sequence_length=1024,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        weight_tying=True,
        mask_token_id=50256,
        eos_token_id=50256,
        pad_token_id=50256,
        block_type="sequential",
        activation_type="swiglu",
        layer_norm_type="default",
        rope=False,
        alibi=False,
        include_bias=False,
        include_qkv_bias=False,
        attention_type="bidirectional",
        shift_logits=False,
        block_size=None,
        use_cache=False,
        **kwargs,
    ):
        self.d_model = d_model
        self.n_layers = n_layers
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.mlp_hidden_size = mlp_hidden_size
        self.mlp_ratio = mlp_ratio
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.max_sequence_length = max_sequence_length
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.weight_tying = weight_tying
        self.mask_token_id = mask_token_id
        self.block_type = block_type
        self.activation_type = activation_type
        self.layer_norm_type = layer_norm_type
        self.rope = rope
        self.alibi = alibi
        self.include_bias = include_bias
        self.include_qkv_bias = include_qkv_bias
        self.attention_type = attention_type
        self.shift_logits = shift_logits
        self.block_size = block_size
        self.use_cache = use_cache
        # transformers' generic name for weight tying follows the official field.
        kwargs["tie_word_embeddings"] = weight_tying
        kwargs.setdefault("architectures", ["LLaDAModelLM"])
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    # Derived sizes (the official model's conventions).
    @property
    def head_dim(self):
        return self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self):
        if self.n_kv_heads is not None:
            return self.n_kv_heads
        return 1 if getattr(self, "multi_query_attention", None) else self.n_heads

    @property
    def effective_mlp_hidden_size(self):
        return self.mlp_hidden_size if self.mlp_hidden_size is not None else self.mlp_ratio * self.d_model

    @property
    def padded_vocab_size(self):
        return self.embedding_size or self.vocab_size
