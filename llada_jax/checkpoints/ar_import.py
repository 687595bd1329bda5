"""Autoregressive checkpoints (LLaMA 2 / 3, Mistral, Qwen2 in the transformers layout) as LLaDA models.

Large diffusion language models are made from AR ones (the official LLaDA pretraining config starts from
`meta-llama/Llama-2-7b-hf`; DiffuLLaMA from LLaMA-2, Dream 7B and Fast-dLLM v2 from Qwen2.5). The network is
the same LLaMA block under other names (the key table `hf_keys.AR_KEYS`); this module maps the config.json of
those families to an `LLaDAConfig` and plans the mask token, which an AR vocabulary does not have:

- `from_ar_config(d)` reads the architecture exactly (hidden sizes, grouped-query heads, RoPE theta, RMSNorm eps,
  tied or untied head, Qwen2's q/k/v biases as `include_qkv_bias`) and refuses by name what the LLaDA network
  cannot represent: another activation, biases other than Qwen2's q/k/v ones, RoPE scaling (LLaMA 3.1's
  `rope_scaling` / `rope_parameters` of a type other than "default"), a head_dim other than d_model / n_heads,
  and a sliding window shorter than the lengths used (`max_sequence_length` is capped at the window; asking
  for more is an error naming `sliding_window`).
- `VocabPlan`: the mask token `<|mdm_mask|>` gets the first id after the tokenizer's vocabulary (after
  config.json's `vocab_size` when the directory has no tokenizer), or with `mask_token=` an existing unused
  token of the tokenizer (LLaMA 3's `<|reserved_special_token_N|>`); the embedding and the output head are
  padded to a multiple of 128 rows, as LLaDA-8B's are (126464 = 988 x 128). The mask token's row and every
  added row start as the mean of the checkpoint's rows (of the embedding, and of the head), so the new token
  starts as an average input and none of them stands out in the logits.
- `write_tokenizer` copies the tokenizer with the mask token added (a special token at the planned id).
- The special ids are config.json's; one it leaves unset (transformers 5 writes null for every id the model was
  not given) is the tokenizer's, and an unset pad is the EOS (LLaDA's convention). Without a tokenizer an unset
  id stays unset: training then names it (it needs the EOS), as sampling names a missing pad / EOS.

The converted model is bidirectional and unshifted by default (a LLaDA model); `attention_type="causal"`
gives exactly the AR model's logits (logits[i] predicting token i + 1), and `shift_logits=True` keeps that
alignment for diffusion training (the prediction for position i read from the output at i - 1).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from typing import Any

from llada_jax.checkpoints import layout, storage
from llada_jax.config import LLaDAConfig
from llada_jax.errors import HFConfigError
from llada_jax.tokenizer import MASK_TOKEN

log = logging.getLogger("llada_jax")

AR_MODEL_TYPES = ("llama", "mistral", "qwen2")
VOCAB_MULTIPLE = 128  # LLaDA-8B's 126464 rows are 988 x 128


@dataclasses.dataclass(frozen=True)
class VocabPlan:
    """The mask token of a converted AR model and the rows of its embedding and output head."""

    source_rows: int  # rows in the checkpoint
    rows: int  # rows after conversion (a multiple of VOCAB_MULTIPLE)
    mask_token_id: int
    mask_token: str
    add_to_tokenizer: bool  # the token is new: the tokenizer copy gets it at mask_token_id


@dataclasses.dataclass(frozen=True)
class ARConfig:
    config: LLaDAConfig  # the converted model
    source: LLaDAConfig  # the checkpoint's own shapes (rows = source_rows), for checking the weights
    vocab: VocabPlan


def is_ar_config(d: dict) -> bool:
    return d.get("model_type") in AR_MODEL_TYPES


def from_ar_config(d: dict[str, Any], *, source: str, tokenizer_dir: str | None = None,
                   mask_token: str | None = None, **overrides) -> ARConfig:
    """The LLaDA model of a LLaMA / Mistral / Qwen2 config.json (dict). `tokenizer_dir`: the tokenizer the mask
    token is planned against (None: none); `mask_token`: use this existing token as the mask; `overrides`: other
    LLaDAConfig fields (attention_type, shift_logits, max_sequence_length, compute settings)."""
    model_type = d.get("model_type")

    def fail(field: str, message: str):
        raise HFConfigError(f"{source}: {field}={d.get(field)!r} {message}")

    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(d.get(field), int) or isinstance(d.get(field), bool):
            raise HFConfigError(f"{source}: needs an integer {field!r}, got {d.get(field)!r}")
    activation = d.get("hidden_act", "silu")
    if activation != "silu":
        fail("hidden_act", "is not supported: the LLaDA MLP is SwiGLU (silu(gate_proj) * up_proj)")
    for field in ("attention_bias", "mlp_bias"):
        if d.get(field):
            fail(field, "is not supported: only the q/k/v biases of Qwen2 can be represented (include_qkv_bias)")
    rope_type, rope_theta = _rope(d, fail)
    if rope_type not in (None, "default"):
        fail("rope_scaling" if d.get("rope_scaling") else "rope_parameters",
             f"(rope_type {rope_type!r}) is not supported: this project implements plain RoPE; LLaMA 3.1-style "
             "scaled frequencies would give different logits")
    d_model, n_heads = d["hidden_size"], d["num_attention_heads"]
    if d.get("head_dim") not in (None, d_model // n_heads):
        fail("head_dim", f"is not supported: the LLaDA attention has head_dim = hidden_size / num_attention_heads "
                         f"= {d_model // n_heads}")
    max_length = int(d.get("max_position_embeddings", 4096))
    window = _sliding_window(d)
    if window is not None and window < max_length:
        asked = overrides.get("max_sequence_length")
        if asked is not None and asked > window:
            fail("sliding_window", f"is shorter than max_sequence_length {asked}: the LLaDA attention is not "
                                   f"windowed, so only sequences up to {window} tokens give the model's outputs")
        log.info("%s: sliding_window %d: max_sequence_length set to %d (max_position_embeddings %d)", source,
                 window, window, max_length)
        max_length = window

    source_rows = d["vocab_size"]
    tokenizer = _load_tokenizer(tokenizer_dir) if tokenizer_dir else None
    vocab = _vocab_plan(source_rows, tokenizer, tokenizer_dir, mask_token, source)
    eos = d.get("eos_token_id")
    if isinstance(eos, list):  # LLaMA 3 Instruct lists several; the first is <|end_of_text|> / <|eot_id|>
        eos = eos[0] if eos else None
    bos = d.get("bos_token_id")
    pad = d.get("pad_token_id")
    if tokenizer is not None:  # an id config.json leaves null is the tokenizer's
        eos = tokenizer.eos_token_id if eos is None else eos
        bos = tokenizer.bos_token_id if bos is None else bos
    pad = eos if pad is None else pad  # LLaDA pads with its EOS
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    fields: dict[str, Any] = dict(
        d_model=d_model, n_layers=d["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=d.get("num_key_value_heads") or n_heads, mlp_hidden_size=d["intermediate_size"],
        vocab_size=max(source_rows, vocab.mask_token_id + 1), embedding_size=vocab.rows,
        max_sequence_length=max_length, rope_theta=float(rope_theta), rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
        weight_tying=bool(d.get("tie_word_embeddings", False)), include_qkv_bias=model_type == "qwen2",
        mask_token_id=vocab.mask_token_id, eos_token_id=eos, pad_token_id=pad, bos_token_id=bos,
    )
    fields.update(overrides)
    try:
        config = LLaDAConfig(**fields)
        shapes = config.replace(embedding_size=source_rows, vocab_size=source_rows, mask_token_id=None,
                                eos_token_id=None, pad_token_id=None, bos_token_id=None)
    except (TypeError, ValueError) as e:
        raise HFConfigError(f"{source}: {e}") from e
    return ARConfig(config, shapes, vocab)


def _rope(d: dict, fail) -> tuple[str | None, float]:
    """(rope type, theta) of a config: transformers 5 writes `rope_parameters`, earlier versions `rope_theta`
    and `rope_scaling`."""
    params = d.get("rope_parameters")
    if isinstance(params, dict) and "rope_type" not in params and params:  # per-layer-type parameters
        fail("rope_parameters", "is not supported: one RoPE for every layer is implemented")
    scaling = d.get("rope_scaling")
    rope_type = None
    if isinstance(scaling, dict):
        rope_type = scaling.get("rope_type", scaling.get("type"))
    if isinstance(params, dict) and params.get("rope_type") not in (None, "default"):
        rope_type = params["rope_type"]
    theta = d.get("rope_theta")
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return rope_type, 10000.0 if theta is None else theta


def _sliding_window(d: dict) -> int | None:
    """The attention window the AR model was run with, or None for full attention."""
    window = d.get("sliding_window")
    if not window:
        return None
    if d.get("model_type") == "qwen2":  # Qwen2 windows only with use_sliding_window, on the layers it names
        layer_types = d.get("layer_types") or []
        if not d.get("use_sliding_window") and "sliding_attention" not in layer_types:
            return None
    return int(window)


def _load_tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(storage.local_copy(directory), local_files_only=True,
                                         trust_remote_code=False)


def _vocab_plan(source_rows: int, tokenizer, tokenizer_dir: str | None, mask_token: str | None,
                source: str) -> VocabPlan:
    def padded(n: int) -> int:
        return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    if mask_token is not None:
        if tokenizer is None:
            raise HFConfigError(f"{source}: mask_token {mask_token!r} needs the tokenizer, and the directory has none")
        vocab = tokenizer.get_vocab()
        if mask_token not in vocab:
            raise HFConfigError(f"{source}: mask_token {mask_token!r} is not a token of the tokenizer in "
                                f"{tokenizer_dir} (give an unused reserved token, e.g. <|reserved_special_token_0|>)")
        mask_id = vocab[mask_token]
        if mask_id >= source_rows:
            raise HFConfigError(f"{source}: mask_token {mask_token!r} has id {mask_id}, past the {source_rows} "
                                "rows of the embedding")
        return VocabPlan(source_rows, padded(source_rows), mask_id, mask_token, False)
    if tokenizer is not None:
        vocab = tokenizer.get_vocab()
        if MASK_TOKEN in vocab:
            return VocabPlan(source_rows, padded(max(source_rows, vocab[MASK_TOKEN] + 1)), vocab[MASK_TOKEN],
                             MASK_TOKEN, False)
        mask_id = len(tokenizer)
    else:
        mask_id = source_rows
    return VocabPlan(source_rows, padded(max(source_rows, mask_id + 1)), mask_id, MASK_TOKEN, tokenizer is not None)


def grow_rows(array, axis: int, plan: VocabPlan):
    """An embedding ([rows, d], axis 0) or output head ([d, rows], axis 1) of the checkpoint with the planned
    rows: the mask token's row and every added row set to the mean of the checkpoint's rows."""
    import numpy as np

    array = np.moveaxis(np.asarray(array), axis, 0)
    mean = array.astype(np.float64).mean(axis=0).astype(array.dtype)
    out = np.empty((plan.rows, *array.shape[1:]), array.dtype)
    out[:plan.source_rows] = array
    out[plan.source_rows:] = mean
    out[plan.mask_token_id] = mean
    return np.moveaxis(out, 0, axis)


def write_tokenizer(src: str, dst: str, plan: VocabPlan) -> None:
    """Copy the tokenizer files of `src` into the directory `dst`, with the mask token added when it is new."""
    if not plan.add_to_tokenizer:
        layout.copy_tokenizer_files(src, dst)
        return
    from tokenizers import AddedToken

    tokenizer = _load_tokenizer(src)
    tokenizer.add_tokens([AddedToken(plan.mask_token, special=True, normalized=False)], special_tokens=True)
    got = tokenizer.convert_tokens_to_ids(plan.mask_token)
    if got != plan.mask_token_id:
        raise HFConfigError(f"{src}: adding {plan.mask_token} to the tokenizer gave id {got}, not the planned "
                            f"{plan.mask_token_id}")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        layout.copy_tokenizer_files(tmp, dst)


def tokenizer_dir(directory: str) -> str | None:
    """The directory's tokenizer (an AR model directory holds its tokenizer files), or None."""
    return directory if layout.tokenizer_files(directory) else None

