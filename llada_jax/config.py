"""Configuration: the LLaDA architecture (`LLaDAConfig`) and the training-run schema (`train_config`).

`LLaDAConfig` is a frozen dataclass whose field names follow the official Hugging Face `config.json` of
GSAI-ML/LLaDA-8B (OLMo-style names) where one exists, plus the JAX-side knobs (dtypes, scanned layers, remat).
It is hashable, so it can be a static argument of jitted functions.

`train_config()` returns the `ml_collections.ConfigDict` that every experiment file in `configs/` starts
from. The names the pretrain / sft flags set (learning_rate, batch_size, ...) sit at the top level; the rest is
grouped (model, optimizer, mesh, checkpoint, ...). The logical-axis sharding rules live here, in config,
not in code.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch", "save_out_proj")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# bidirectional: LLaDA (every position sees every other); causal: an autoregressive model (position i sees
# positions <= i), used to prove an AR import exact and as the start of causal-to-bidirectional adaptation;
# block_causal: block diffusion (BD3-LM, LLaDA 2.0), a position in block b sees every position of blocks <= b.
ATTENTION_TYPES = ("bidirectional", "causal", "block_causal")
# The router's scores of a Mixture-of-Experts MLP: softmax over the experts (LLaDA-MoE, OLMoE) or a sigmoid per
# expert (LLaDA 2.x, DeepSeek-V3).
ROUTER_SCORES = ("softmax", "sigmoid")


@dataclasses.dataclass(frozen=True)
class LLaDAConfig:
    """Architecture of a LLaDA model (a bidirectional LLaMA) plus compute settings."""

    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None: equal to n_heads (the official 8B uses full multi-head attention)
    mlp_hidden_size: int = 12288
    vocab_size: int = 126464
    embedding_size: int | None = None  # rows of the embedding and output head; None: vocab_size
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int = 126081
    bos_token_id: int = 126080
    include_qkv_bias: bool = False  # biases on q/k/v (Qwen2), the official config's own field
    attention_type: str = "bidirectional"  # one of ATTENTION_TYPES
    # The prediction for position i is read from the network's output at i - 1 (position 0 from its own):
    # the next-token alignment of an AR model kept through adaptation (Dream, DiffuLLaMA).
    shift_logits: bool = False
    block_size: int | None = None  # block_causal: positions per block
    # Attention of the LLaDA 2.x family: RMSNorm over head_dim on each query and key head before RoPE (its weights
    # [head_dim], shared by the heads), and RoPE on the first head_dim * partial_rotary_factor dimensions only.
    qk_norm: bool = False
    partial_rotary_factor: float = 1.0
    # Mixture of Experts (0 experts: every MLP dense). After the first `first_dense_layers` layers (dense,
    # mlp_hidden_size wide), each MLP is `num_experts` SwiGLU experts of `expert_hidden_size`, `experts_per_token`
    # chosen per token by a router, plus `num_shared_experts` always used (one SwiGLU of num_shared_experts *
    # expert_hidden_size). The router (float32): scores by `router_score`; `router_expert_bias` adds a learned
    # bias to the scores for the choice only (auxiliary-loss-free balancing); with `router_groups` > 1 the experts
    # fall in that many groups, each scored by the sum of its two best scores, and the choice is made inside the
    # best `router_topk_groups`; the chosen experts' unbiased scores are the weights, normalised to sum 1 when
    # `router_norm_topk`, times `router_scale`.
    num_experts: int = 0
    experts_per_token: int = 1
    expert_hidden_size: int | None = None
    num_shared_experts: int = 0
    first_dense_layers: int = 0
    router_score: str = "softmax"  # one of ROUTER_SCORES
    router_expert_bias: bool = False
    router_groups: int = 1
    router_topk_groups: int = 1
    router_norm_topk: bool = False
    router_scale: float = 1.0
    # JAX-side settings (not part of the HF config).
    dtype: str = "float32"  # compute dtype of matmuls and attention
    param_dtype: str = "float32"  # storage dtype of the parameters (the fp32 master copy by default)
    scan_layers: bool = True  # stack the blocks and run them with lax.scan (compile time flat in depth)
    remat_policy: str = "none"  # one of REMAT_POLICIES
    attention_impl: str = "auto"  # auto: cuDNN flash attention on GPU in 16-bit, XLA otherwise

    def __post_init__(self):
        def fail(field: str, msg: str):
            raise ValueError(f"LLaDAConfig.{field}: {msg}")

        for name in ("d_model", "n_layers", "n_heads", "mlp_hidden_size", "vocab_size", "max_sequence_length"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                fail(name, f"expected a positive integer, got {getattr(self, name)!r}")
        if self.d_model % self.n_heads:
            fail("n_heads", f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            fail("n_heads", f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_kv_heads is not None and (self.n_kv_heads <= 0 or self.n_heads % self.n_kv_heads):
            fail("n_kv_heads", f"n_heads {self.n_heads} must be a multiple of n_kv_heads {self.n_kv_heads}")
        if self.embedding_size is not None and self.embedding_size < self.vocab_size:
            fail("embedding_size", f"{self.embedding_size} is smaller than vocab_size {self.vocab_size}")
        for name in ("mask_token_id", "eos_token_id", "pad_token_id", "bos_token_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.padded_vocab_size:
                fail(name, f"{value} is outside the vocabulary [0, {self.padded_vocab_size})")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                fail(name, f"expected one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            fail("remat_policy", f"expected one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention_type not in ATTENTION_TYPES:
            fail("attention_type", f"expected one of {ATTENTION_TYPES}, got {self.attention_type!r}")
        if self.attention_type == "block_causal":
            if not isinstance(self.block_size, int) or isinstance(self.block_size, bool) or self.block_size <= 0:
                fail("block_size", f"attention_type block_causal needs a positive block_size, got {self.block_size!r}")
            if self.shift_logits:
                fail("shift_logits", "is not supported with attention_type block_causal (the first position of a "
                                     "block would read the output of the block before it)")
        elif self.block_size is not None:
            fail("block_size", f"applies to attention_type block_causal only (attention_type is "
                               f"{self.attention_type!r})")
        for name in ("include_qkv_bias", "shift_logits", "weight_tying", "scan_layers"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"expected true or false, got {getattr(self, name)!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            fail("attention_impl", f"expected one of {ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if not isinstance(self.qk_norm, bool):
            fail("qk_norm", f"expected true or false, got {self.qk_norm!r}")
        rotary = self.head_dim * self.partial_rotary_factor
        if not 0 < self.partial_rotary_factor <= 1 or rotary != int(rotary) or int(rotary) % 2:
            fail("partial_rotary_factor", f"expected a factor in (0, 1] giving an even number of the head_dim "
                                          f"{self.head_dim} dimensions, got {self.partial_rotary_factor!r}")
        self._check_moe(fail)

    def _check_moe(self, fail) -> None:
        def count(name: str, low: int):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                fail(name, f"expected an integer >= {low}, got {value!r}")

        count("num_experts", 0)
        if not self.num_experts:
            moe_fields = ("experts_per_token", "expert_hidden_size", "num_shared_experts", "first_dense_layers",
                          "router_score", "router_expert_bias", "router_groups", "router_topk_groups",
                          "router_norm_topk", "router_scale")
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            changed = [name for name in moe_fields if getattr(self, name) != defaults[name]]
            if changed:
                fail(changed[0], "applies to Mixture-of-Experts models only (num_experts is 0)")
            return
        for name, low in (("experts_per_token", 1), ("num_shared_experts", 0), ("first_dense_layers", 0),
                          ("router_groups", 1), ("router_topk_groups", 1)):
            count(name, low)
        if not isinstance(self.expert_hidden_size, int) or self.expert_hidden_size <= 0:
            fail("expert_hidden_size", f"a Mixture-of-Experts model needs a positive expert_hidden_size, got "
                                       f"{self.expert_hidden_size!r}")
        if self.experts_per_token > self.num_experts:
            fail("experts_per_token", f"{self.experts_per_token} is more than num_experts {self.num_experts}")
        if self.first_dense_layers >= self.n_layers:
            fail("first_dense_layers", f"{self.first_dense_layers} leaves no Mixture-of-Experts layer of "
                                       f"{self.n_layers}")
        if self.router_score not in ROUTER_SCORES:
            fail("router_score", f"expected one of {ROUTER_SCORES}, got {self.router_score!r}")
        if self.num_experts % self.router_groups:
            fail("router_groups", f"{self.router_groups} groups do not divide num_experts {self.num_experts}")
        if self.router_topk_groups > self.router_groups:
            fail("router_topk_groups", f"{self.router_topk_groups} is more than router_groups {self.router_groups}")
        if self.router_groups > 1 and self.num_experts // self.router_groups < 2:
            fail("router_groups", "each group needs at least 2 experts (a group is scored by its two best)")
        if self.experts_per_token > self.router_topk_groups * (self.num_experts // self.router_groups):
            fail("experts_per_token", f"{self.experts_per_token} is more than the experts of the "
                                      f"{self.router_topk_groups} kept groups")
        for name in ("router_expert_bias", "router_norm_topk"):
            if not isinstance(getattr(self, name), bool):
                fail(name, f"expected true or false, got {getattr(self, name)!r}")
        if not isinstance(self.router_scale, (int, float)) or not self.router_scale > 0:
            fail("router_scale", f"expected a positive number, got {self.router_scale!r}")

    # Derived sizes -------------------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def effective_n_kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def rotary_dim(self) -> int:
        """The leading dimensions of each query / key head that RoPE rotates (the rest pass through)."""
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) has a Mixture-of-Experts MLP."""
        return self.is_moe and layer >= self.first_dense_layers

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.first_dense_layers if self.is_moe else 0

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding matrix and of the output head (the logits' last dimension)."""
        return self.embedding_size or self.vocab_size

    # Presets -------------------------------------------------------------------------------------------

    @classmethod
    def tiny(cls, **overrides) -> "LLaDAConfig":
        """A few small layers over a 512-token vocabulary: runs in seconds on a CPU (tests, demos)."""
        fields = dict(
            d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, mlp_hidden_size=192, vocab_size=512,
            max_sequence_length=512, rope_theta=10000.0,
            mask_token_id=511, eos_token_id=510, pad_token_id=510, bos_token_id=509,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def llada_8b(cls, **overrides) -> "LLaDAConfig":
        """The exact shape of GSAI-ML/LLaDA-8B-Base / -Instruct (8,015,581,184 parameters)."""
        fields = dict(
            d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
            vocab_size=126464, embedding_size=126464, max_sequence_length=4096, rope_theta=500000.0,
            rms_norm_eps=1e-5, weight_tying=False,
            mask_token_id=126336, eos_token_id=126081, pad_token_id=126081, bos_token_id=126080,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def llama2_7b(cls, **overrides) -> "LLaDAConfig":
        """LLaMA-2-7B as it is imported (the official LLaDA pretraining config starts from it): 32000 tokens plus
        the mask token 32000, the embedding and head padded to 32128 rows; RoPE theta 10000, eps 1e-5."""
        fields = dict(
            d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, mlp_hidden_size=11008, vocab_size=32001,
            embedding_size=32128, max_sequence_length=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
            weight_tying=False, mask_token_id=32000, eos_token_id=2, pad_token_id=2, bos_token_id=1,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def qwen2_5_7b(cls, **overrides) -> "LLaDAConfig":
        """Qwen2.5-7B as it is imported (Dream 7B starts from it): 28 layers, grouped-query attention (28 query,
        4 key/value heads), q/k/v biases, 152064 embedding rows (the mask token 151665 is the first id past the
        tokenizer's 151665), RoPE theta 1e6, eps 1e-6, 32768 positions."""
        fields = dict(
            d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4, mlp_hidden_size=18944, vocab_size=152064,
            embedding_size=152064, max_sequence_length=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
            weight_tying=False, include_qkv_bias=True, mask_token_id=151665, eos_token_id=151643,
            pad_token_id=151643, bos_token_id=151643,
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def tiny_moe(cls, **overrides) -> "LLaDAConfig":
        """`tiny` with the LLaDA 2.x network: a dense first layer, then 8 experts in 4 groups (2 kept), 2 chosen per
        token plus a shared expert, sigmoid router with expert bias, grouped-query attention, QK-norm, partial
        rotary."""
        fields = dict(
            n_layers=3, n_kv_heads=2, mlp_hidden_size=128, qk_norm=True, partial_rotary_factor=0.5,
            num_experts=8, experts_per_token=2, expert_hidden_size=32, num_shared_experts=1, first_dense_layers=1,
            router_score="sigmoid", router_expert_bias=True, router_groups=4, router_topk_groups=2,
            router_norm_topk=True, router_scale=2.5, rms_norm_eps=1e-6,
        )
        return cls.tiny(**{**fields, **overrides})

    @classmethod
    def _llada2(cls, fields: dict, overrides: dict) -> "LLaDAConfig":
        """The LLaDA 2.x network (inclusionAI/LLaDA2.0-mini / -flash config.json): 4 kv heads of 128, QK-norm, RoPE
        (theta 600000) on the first 64 dimensions, 256 experts in 8 groups (4 kept), 8 chosen plus one shared,
        sigmoid router with expert bias, weights normalised then times 2.5, the first layer dense; 157184 tokens,
        mask 156895, EOS / pad 156892 (`<|endoftext|>`); block diffusion in blocks of 32."""
        base = dict(
            n_kv_heads=4, vocab_size=157184, embedding_size=157184, max_sequence_length=16384, rope_theta=600000.0,
            rms_norm_eps=1e-6, weight_tying=False, mask_token_id=156895, eos_token_id=156892, pad_token_id=156892,
            bos_token_id=None, qk_norm=True, partial_rotary_factor=0.5, num_experts=256, experts_per_token=8,
            num_shared_experts=1, first_dense_layers=1, router_score="sigmoid", router_expert_bias=True,
            router_groups=8, router_topk_groups=4, router_norm_topk=True, router_scale=2.5,
            attention_type="block_causal", block_size=32,
        )
        return cls(**{**base, **fields, **overrides})

    @classmethod
    def llada2_mini(cls, **overrides) -> "LLaDAConfig":
        """LLaDA2.0-mini (and LLaDA2.1-mini, 32768 positions): 20 layers of 2048, 16 heads, dense MLP 5120, experts
        of 512 (16.26B parameters, 1.44B active per token)."""
        return cls._llada2(dict(d_model=2048, n_layers=20, n_heads=16, mlp_hidden_size=5120, expert_hidden_size=512),
                           overrides)

    @classmethod
    def llada2_flash(cls, **overrides) -> "LLaDAConfig":
        """LLaDA2.0-flash (and LLaDA2.1-flash): 32 layers of 4096, 32 heads, dense MLP 9216, experts of 1024
        (about 100B parameters, 6.1B active per token)."""
        return cls._llada2(dict(d_model=4096, n_layers=32, n_heads=32, mlp_hidden_size=9216, expert_hidden_size=1024),
                           overrides)

    @classmethod
    def llada_moe_7b(cls, **overrides) -> "LLaDAConfig":
        """LLaDA-MoE-7B-A1B (inclusionAI, OLMoE-style): 16 layers of 2048, 16 heads, QK-norm, 64 experts of 1024 in
        every layer, 8 chosen by a softmax router (weights not renormalised), RoPE theta 50000, 8192 positions;
        bidirectional. Mask 156895, EOS / pad 156892."""
        fields = dict(
            d_model=2048, n_layers=16, n_heads=16, n_kv_heads=16, mlp_hidden_size=8192, vocab_size=157184,
            embedding_size=157184, max_sequence_length=8192, rope_theta=50000.0, rms_norm_eps=1e-5,
            weight_tying=False, mask_token_id=156895, eos_token_id=156892, pad_token_id=156892, bos_token_id=None,
            qk_norm=True, num_experts=64, experts_per_token=8, expert_hidden_size=1024, router_score="softmax",
        )
        return cls(**{**fields, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> "LLaDAConfig":
        """The preset `name`, one of PRESETS."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
        return getattr(cls, name)(**overrides)

    # Serialisation -------------------------------------------------------------------------------------

    def replace(self, **changes) -> "LLaDAConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> "LLaDAConfig":
        _check_fields(cls, d, source)
        return cls(**d)


# Fields a training run may change from the checkpoint it starts from without changing any shape (adapting a causal
# model to bidirectional attention, training with the shift, block diffusion): what a run trains is the
# checkpoint's architecture with these of its own, and a LoRA checkpoint records them with its adapters.
ADAPTABLE_FIELDS = ("attention_type", "shift_logits", "block_size")

# The projections of a block that can carry LoRA adapters: the official module names (what PEFT targets in the
# exported PyTorch model). The attention's q/k/v and output, the dense MLP's gate (ff_proj), up and down (ff_out),
# and a Mixture-of-Experts MLP's shared experts (shared_gate / shared_up / shared_down). A target a layer does not
# have is skipped there (a MoE layer has no ff_proj, a dense one no shared expert); the routed experts take none.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out", "shared_gate", "shared_up",
                "shared_down")


# The model presets: LLaDAConfig class methods of these names (`LLaDAConfig.preset`, the commands' --preset / --model).
PRESETS = ("tiny", "tiny_moe", "llada_8b", "llama2_7b", "qwen2_5_7b", "llada2_mini", "llada2_flash", "llada_moe_7b")


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021, "LoRA"): each targeted projection W of every block becomes
    W + (alpha / rank) A B, A [in, rank] and B [rank, out], the base W frozen. PEFT's conventions: A starts
    uniform in +-1/sqrt(in) (PyTorch's Linear init), B at zero (so a new adapter changes nothing), and dropout
    applies to the adapter's input only, in training."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        def fail(field: str, msg: str):
            raise ValueError(f"lora.{field}: {msg}")

        object.__setattr__(self, "targets", parse_lora_targets(self.targets))  # hashable: part of the graphdef

        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            fail("rank", f"expected a positive integer, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not 0 < self.alpha < float("inf"):
            fail("alpha", f"expected a positive number, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            fail("dropout", f"expected a probability in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in LORA_TARGETS]
        if unknown or not self.targets or len(set(self.targets)) != len(self.targets):
            what = f"unknown target {unknown[0]!r}" if unknown else "targets must be distinct and not empty"
            fail("targets", f"{what}; expected some of {', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        """The factor of the adapters' product: alpha / rank (PEFT's `scaling`)."""
        return float(self.alpha) / self.rank

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "alpha": float(self.alpha), "dropout": float(self.dropout),
                "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "lora") -> "LoRAConfig":
        _check_fields(cls, d, source)
        return cls(**d)  # (targets may be a list or a string: __post_init__ makes them a tuple)


def _check_fields(cls, d: dict[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(known)}")


def parse_lora_targets(targets) -> tuple[str, ...]:
    """Targets as a tuple, from a tuple / list or a comma- or space-separated string ("q_proj,v_proj")."""
    if isinstance(targets, str):
        return tuple(t for t in targets.replace(",", " ").split() if t)
    return tuple(targets)


# The logical-axis rules: logical name -> mesh axis, tuple of mesh axes, or None (replicated).
# Parameters and activations name their dimensions with these logical names (see llada_jax/model/); the mesh has
# axes (data, fsdp, expert, tensor). A mesh axis is used at most once per array: a later dimension whose rule names
# an axis that is already taken is left unsharded (e.g. activations [batch, length, embed] shard batch over
# data and fsdp, so embed stays whole there, while the parameter [embed, mlp] shards embed over fsdp).
DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("norm", None),
    ("exp", "expert"),  # the experts of a Mixture-of-Experts MLP
    ("expert_mlp", "tensor"),  # an expert's hidden width
)


def train_config(model: LLaDAConfig | None = None, *, task: str = "pretrain") -> ml_collections.ConfigDict:
    """The full schema of a training run, with the original LLaDA pretraining recipe as defaults.

    Every field exists here with its type, so `--config.key=value` overrides are type-checked and a
    misspelled key is an error rather than a silently ignored setting.
    """
    model = model or LLaDAConfig.tiny()
    c = ml_collections.ConfigDict()
    c.task = task  # "pretrain" | "sft"
    c.model = ml_collections.ConfigDict(model.to_dict())
    # Set by the pretrain / sft flags of the same names.
    c.model_name_or_path = ""  # initialise params only from an Orbax checkpoint or an HF directory
    c.output_dir = ""
    c.data_path = ""  # JSONL file(s), glob, directory, or tfds:NAME[/CONFIG]:SPLIT
    c.learning_rate = 5e-4
    c.batch_size = 8  # sequences per micro-batch, global over all devices and processes
    c.gradient_accumulation_steps = 8  # micro-batches per optimizer step
    c.max_steps = 100000
    c.warmup_steps = 2000
    c.max_length = 4096
    c.eps = 1e-3  # p_mask = (1 - eps) t + eps
    c.random_length_prob = 0.01  # pretraining: chance that a batch is cut to a random length
    c.lr_scheduler_type = "cosine"  # cosine | linear | constant | wsd
    c.save_steps = 1000
    c.logging_steps = 10
    c.seed = 0
    # Evaluation: the mean loss over the first eval_batches batches of eval_data_path (same format and task
    # as data_path), every eval_steps steps and at the end; logged as eval_loss. "" : no evaluation.
    c.eval_data_path = ""
    c.eval_steps = 1000
    c.eval_batches = 8

    c.data = ml_collections.ConfigDict()
    c.data.tokenizer = ""  # HF tokenizer directory, needed for {"text"} / chat records
    c.data.pretrain_mode = "concat"  # concat (documents joined with EOS, cut into max_length rows) | pad
    c.data.too_long = "error"  # SFT examples longer than max_length: error | skip | truncate_prompt
    # Packing: several documents (pretraining) or SFT examples per row, each its own segment (segment_ids): it
    # attends only to itself, its positions restart at 0, its blocks are laid from its own start; padding only at a
    # row's end. SFT answers are then EOS-padded to a multiple of pad_multiple (at least one EOS; 0: model.block_size
    # for block_causal models, else 1) instead of to max_length.
    c.data.pack = False
    c.data.pad_multiple = 0
    c.data.skip_invalid = False  # skip (and count) malformed records instead of stopping
    c.data.shuffle = True
    c.data.num_workers = 0  # Grain worker processes per data shard (0: in the training process)
    # Independent row streams that make up each global batch (0: one per row, i.e. batch_size). The data order
    # depends on this number, never on the process count, which must divide it; batch_size must be a multiple of it.
    c.data.num_shards = 0
    c.data.prefetch_buffer_size = 2  # batches assembled ahead by a background thread (0: none)
    c.data.read_threads = 1  # threads parsing records in each reading process (Grain ReadOptions.num_threads)
    c.data.worker_buffer_size = 64  # parsed records buffered ahead per reading thread pool / worker process
    c.data.tfds_data_dir = ""  # data_dir of a tfds:NAME[/CONFIG]:SPLIT data path ("": the TFDS default)
    c.data.index_cache_dir = ""  # JSONL line-index cache ("": ~/.cache/llada_jax/jsonl_index; "off": none)

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.b1 = 0.9
    c.optimizer.b2 = 0.95
    c.optimizer.eps = 1e-8
    c.optimizer.weight_decay = 0.1
    c.optimizer.grad_clip = 1.0
    c.optimizer.min_lr_ratio = 0.1  # final learning rate of cosine / linear / wsd as a fraction of the peak
    c.optimizer.decay_fraction = 0.1  # wsd: fraction of max_steps spent in the final decay

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: all remaining devices
    c.mesh.expert = 1  # expert parallelism (Mixture-of-Experts models): the experts split over this axis
    c.mesh.tensor = 1
    c.mesh.dcn_data = 1  # data-parallel replicas across slices / nodes (hybrid mesh)
    c.mesh.logical_axis_rules = tuple((name, axes) for name, axes in DEFAULT_LOGICAL_AXIS_RULES)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.keep = 3  # the last K checkpoints are kept
    c.checkpoint.async_save = True
    # Resume from this step of output_dir instead of the latest (0: the latest finished step); the steps after it
    # are deleted. For a newest checkpoint that cannot be read (the error lists the readable older steps).
    c.checkpoint.restore_step = 0

    # Causal-to-bidirectional adaptation of an AR checkpoint (DiffuLLaMA's attention-mask annealing): over the
    # first mask_annealing_steps optimizer steps the attention goes from causal to the model's own
    # (bidirectional), each future position visible with a probability growing linearly to 1 (0: off).
    c.adaptation = ml_collections.ConfigDict()
    c.adaptation.mask_annealing_steps = 0

    # Block diffusion (model.attention_type = "block_causal"): each block's mask rate ~ U[mask_rate_min,
    # mask_rate_max] (BD3-LM's clipped schedule; its search selects [0.3, 0.8] for blocks of 8 and 16 tokens),
    # and an optional block-size schedule: ((step, block_size), ...) sorted by step, each size used from its step
    # on (before the first entry: model.block_size), as LLaDA 2.0 grows the block size and brings it back down.
    c.block_diffusion = ml_collections.ConfigDict()
    c.block_diffusion.mask_rate_min = 0.3
    c.block_diffusion.mask_rate_max = 0.8
    c.block_diffusion.block_size_schedule = ()

    # Parameter-efficient fine-tuning (see LoRAConfig): the model from model_name_or_path is the frozen base
    # (stored in model.param_dtype: bfloat16 halves it), only the adapters train (float32 masters and moments),
    # and checkpoints hold the adapters plus a reference to the base. targets: comma-separated, of LORA_TARGETS.
    c.lora = ml_collections.ConfigDict()
    c.lora.enabled = False
    c.lora.rank = LoRAConfig.rank
    c.lora.alpha = LoRAConfig.alpha
    c.lora.dropout = LoRAConfig.dropout
    c.lora.targets = ",".join(LORA_TARGETS)

    # Terms of the objective beyond the diffusion loss (see llada_jax.diffusion and llada_jax.train.step).
    # complementary_masking (SFT): each example is trained twice per step, the second time with the complement of
    # its answer mask (every answer token predicted once per pair; LLaDA 2.0). confidence_beta: + beta x the mean
    # entropy of the predictions at the masked positions the model already predicts right (CAP / dParallel's
    # confidence loss; dFactory recommends 2.0), 0: off.
    c.loss = ml_collections.ConfigDict()
    c.loss.complementary_masking = False
    c.loss.confidence_beta = 0.0

    # Expert balancing of Mixture-of-Experts models. bias_update_rate: after each step every MoE layer's
    # expert_bias moves by rate x sign(mean load - expert's load) (DeepSeek-V3's auxiliary-loss-free balancing,
    # 0.001 there); -1: 0.001 for a model with router_expert_bias whose weights are trained (not LoRA), else off.
    # load_balance_loss / router_z_loss: coefficients of the auxiliary losses (LLaDA-MoE: 0.01 and 0.001), 0: off.
    c.moe = ml_collections.ConfigDict()
    c.moe.bias_update_rate = -1.0
    c.moe.load_balance_loss = 0.0
    c.moe.router_z_loss = 0.0

    c.max_consecutive_nonfinite = 10  # stop after this many skipped (non-finite) updates in a row
    c.wandb = ml_collections.ConfigDict()
    c.wandb.enabled = False
    c.wandb.project = "llada-jax"
    c.wandb.run_name = ""
    return c


def sft_defaults(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Apply the original LLaDA SFT recipe (lr 1e-5, batch 4 x 16 accumulation, 10k steps, warmup 500)."""
    c.task = "sft"
    c.learning_rate = 1e-5
    c.batch_size = 4
    c.gradient_accumulation_steps = 16
    c.max_steps = 10000
    c.warmup_steps = 500
    c.random_length_prob = 0.0  # the SFT objective keeps whole examples
    return c


def model_config_from(c: ml_collections.ConfigDict) -> LLaDAConfig:
    """The LLaDAConfig described by a training config's `model` group."""
    return LLaDAConfig.from_dict(dict(c.model), source="config.model")


def lora_config_from(c: ml_collections.ConfigDict) -> LoRAConfig | None:
    """The LoRAConfig of a training config's `lora` group, None when LoRA is off."""
    if "lora" not in c or not c.lora.enabled:
        return None
    return LoRAConfig.from_dict({k: v for k, v in c.lora.items() if k != "enabled"}, source="config.lora")


def padding_token_id(config) -> int:
    """The id prompts are left-padded with: `pad_token_id`, else `eos_token_id` (LLaDA pads with its EOS). The
    padded positions are outside the attention mask, so they change no output; a model with neither id is a
    ValueError naming the field (there is nothing to derive it from)."""
    if config.pad_token_id is not None:
        return config.pad_token_id
    if config.eos_token_id is not None:
        return config.eos_token_id
    raise ValueError("pad_token_id is not set, nor eos_token_id (LLaDA pads with its EOS): prompts cannot be "
                     "left-padded; set pad_token_id (or eos_token_id) in the model's config")


# ----------------------------------------------------------------------------------------------------
# Settings that would not apply
# ----------------------------------------------------------------------------------------------------


def _unused_groups(c: ml_collections.ConfigDict, model: LLaDAConfig):
    """(options, why they do not apply) for each group of options that this run would not read: those of a feature
    that is off (naming what turns it on), of the other task, of another learning-rate schedule."""
    if not c.lora.enabled:
        yield (("lora.rank", "lora.alpha", "lora.dropout", "lora.targets"),
               "lora.enabled is false: set --config.lora.enabled=true to train LoRA adapters (without it the whole "
               "model is trained)")
    if not c.wandb.enabled:
        yield ("wandb.project", "wandb.run_name"), "wandb.enabled is false (set --config.wandb.enabled=true)"
    if not c.eval_data_path:
        yield ("eval_steps", "eval_batches"), "eval_data_path is empty: no evaluation runs (give eval_data_path)"
    if model.attention_type != "block_causal":
        yield (("block_diffusion.mask_rate_min", "block_diffusion.mask_rate_max",
                "block_diffusion.block_size_schedule"),
               f"model.attention_type is {model.attention_type!r} (block_causal models only)")
    else:
        yield ("eps",), ("model.attention_type is 'block_causal' (block diffusion draws each block's mask rate from "
                         "block_diffusion.mask_rate_min / mask_rate_max)")
    if c.task == "sft":
        yield ("random_length_prob", "data.pretrain_mode"), "task is 'sft' (pretraining only)"
    else:
        yield ("data.too_long",), f"task is {c.task!r} (SFT only: pretraining cuts documents into rows)"
        yield ("data.pad_multiple",), (f"task is {c.task!r} (SFT only: the EOS padding of packed answers; a "
                                       "pretraining document ends with one EOS)")
        yield ("loss.complementary_masking",), (f"task is {c.task!r} (SFT only: the complement of an answer's mask; "
                                                "pretraining draws every token's mask independently)")
    if c.task == "sft" and not c.data.pack:
        yield ("data.pad_multiple",), ("data.pack is false: unpacked SFT examples are padded to max_length "
                                       "(set --config.data.pack=true)")
    if not model.is_moe:
        yield (("moe.bias_update_rate", "moe.load_balance_loss", "moe.router_z_loss"),
               "the model has no experts (model.num_experts is 0)")
    elif not model.router_expert_bias:
        yield ("moe.bias_update_rate",), "model.router_expert_bias is false (the router has no bias to update)"
    elif c.lora.enabled:
        yield ("moe.bias_update_rate",), ("lora.enabled is true: the router's expert_bias belongs to the frozen base "
                                          "(LoRA trains adapters only)")
    if c.lr_scheduler_type != "wsd":
        yield ("optimizer.decay_fraction",), f"lr_scheduler_type is {c.lr_scheduler_type!r} (wsd only)"
    if c.lr_scheduler_type == "constant":
        yield ("optimizer.min_lr_ratio",), "lr_scheduler_type is 'constant' (the decaying schedules only)"
    if not any(str(path).startswith("tfds:") for path in (c.data_path, c.eval_data_path)):
        yield ("data.tfds_data_dir",), "neither data_path nor eval_data_path is a tfds:NAME:SPLIT dataset"


def override_keys(overrides) -> tuple[str, ...]:
    """The dotted keys that `--config.key=value` strings set ("lora.rank" for "--config.lora.rank=8")."""
    return tuple(item[len("--config."):].split("=", 1)[0] for item in overrides
                 if item.startswith("--config.") and "=" in item)


def unused_settings(c: ml_collections.ConfigDict, model: LLaDAConfig, overridden=()) -> str | None:
    """A one-line message naming the options that are given but that this run would not use, or None.

    An option is given when it differs from the schema's default for the config's task (`train_config`, with
    `sft_defaults` for SFT) or when it is among `overridden`, the keys a command line set (`override_keys`), even
    to the default value. So a config file counts like the command line, and one that writes every default (as
    create-configs does) gives nothing. `model`: the model the run trains (its attention type, which may come
    from the checkpoint started from).
    """
    defaults = train_config(task=c.task)
    if c.task == "sft":
        sft_defaults(defaults)

    def value(config, dotted):
        for part in dotted.split("."):
            config = config[part]
        return tuple(config) if isinstance(config, list) else config

    for options, why in _unused_groups(c, model):
        given = [o for o in options if o in overridden or value(c, o) != value(defaults, o)]
        if given:
            return f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set, but {why}"
    return None


# ----------------------------------------------------------------------------------------------------
# Loading experiment files and command-line overrides
# ----------------------------------------------------------------------------------------------------

# Keys of a create-configs JSON that live elsewhere in the schema.
_JSON_ALIASES = {"mask_token_id": ("model", "mask_token_id")}
_JSON_SECTIONS = {"pretraining": "pretrain", "sft": "sft"}


def load_config(path: str, task: str | None = None) -> ml_collections.ConfigDict:
    """Load an experiment: a `configs/*.py` file with `get_config()` (`file.py:ARG` calls `get_config("ARG")`), or
    a JSON file (as `llada-jax create-configs` writes).

    A JSON file holds {"pretraining": {...}} and/or {"sft": {...}} sections of flat seed keys
    (learning_rate, batch_size, ...) and optional nested groups ("model", "optimizer", "mesh", ...); `task`
    picks the section. Unknown keys are errors naming the key and the file.
    """
    import importlib.util
    import os

    arg = None
    if ".py:" in path:
        path, arg = path.split(".py:", 1)
        path += ".py"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    if path.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"llada_jax_config_{abs(hash(path))}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "get_config"):
            raise ValueError(f"{path}: a config file must define get_config()")
        config = module.get_config() if arg is None else module.get_config(arg)
        if task is not None and config.task != task:
            raise ValueError(f"{path}: this is a {config.task!r} config, but the command is {task!r}")
        return config
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
        return _config_from_json(raw, path, task)
    raise ValueError(f"{path}: expected a .py (get_config) or .json config file")


def _config_from_json(raw: dict, path: str, task: str | None) -> ml_collections.ConfigDict:
    sections = {k: v for k, v in raw.items() if k in _JSON_SECTIONS}
    if sections:
        wanted = {v: k for k, v in _JSON_SECTIONS.items()}.get(task) if task else None
        if wanted is None:
            if len(sections) > 1:
                raise ValueError(f"{path}: holds sections {sorted(sections)}; say which task to run")
            wanted = next(iter(sections))
        if wanted not in sections:
            raise ValueError(f"{path}: no {wanted!r} section for the {task!r} command (has {sorted(sections)})")
        body, task = sections[wanted], _JSON_SECTIONS[wanted]
    else:
        body, task = raw, raw.get("task", task or "pretrain")
    body = dict(body)
    model_fields = body.pop("model", None)
    model = LLaDAConfig.from_dict(model_fields, source=f"{path}: model") if model_fields else LLaDAConfig.llada_8b()
    config = train_config(model, task=task)
    if task == "sft":
        sft_defaults(config)
    body.pop("task", None)
    _merge(config, body, path, prefix="")
    return config


def _merge(config: ml_collections.ConfigDict, values: dict, path: str, prefix: str) -> None:
    for key, value in values.items():
        target, name = config, key
        if not prefix and key in _JSON_ALIASES:
            group, name = _JSON_ALIASES[key]
            target = config[group]
        if name not in target:
            raise ValueError(f"{path}: unknown config key {prefix + key!r}")
        if isinstance(target[name], ml_collections.ConfigDict):
            if not isinstance(value, dict):
                raise ValueError(f"{path}: {prefix + key!r} must be an object")
            _merge(target[name], value, path, prefix=f"{prefix}{key}.")
        else:
            _set(target, name, value, f"{path}: {prefix + key}")


def _set(target: ml_collections.ConfigDict, name: str, value, where: str) -> None:
    current = target[name]
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(tuple(v) if isinstance(v, list) else v for v in value)
    try:
        target[name] = value
    except TypeError as e:
        raise ValueError(f"{where}: expected {type(current).__name__}, got {value!r}") from e


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` strings (values parsed as the field's type) to `config` in place."""
    import ast

    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise ValueError(f"unrecognized argument {item!r} (overrides look like --config.key=value)")
        dotted, text = item[len("--config."):].split("=", 1)
        *groups, name = dotted.split(".")
        target = config
        for g in groups:
            if g not in target or not isinstance(target[g], ml_collections.ConfigDict):
                raise ValueError(f"{item}: no config group {g!r}")
            target = target[g]
        if name not in target:
            raise ValueError(f"{item}: unknown config key {dotted!r}")
        current = target[name]
        if isinstance(current, str):
            value = text
        elif isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"{item}: expected true or false")
            value = text.lower() in ("true", "1")
        elif current is None:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text
        else:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"{item}: cannot parse {text!r} as {type(current).__name__}") from e
        _set(target, name, value, item)
    return config
