"""Tiny random autoregressive checkpoints (LLaMA, Mistral, Qwen2) built with transformers, with a small
byte-level BPE tokenizer that has no mask token, as an AR model directory has."""

import json
import os

import numpy as np
import torch

FAMILIES = ("llama", "mistral", "qwen2")
TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, a diffusion model from an AR one"] * 40


def write_tokenizer(directory: str) -> int:
    """An AR-style tokenizer (BOS <s>, EOS </s>, no mask token) in `directory`; returns its length."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "<s>", "</s>", "<|reserved_0|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(directory)
    return len(AutoTokenizer.from_pretrained(directory))


def make_ar_dir(directory: str, family: str, *, tied: bool = False, dtype=torch.float32, extra_rows: int = 0,
                shard_size: str | None = None, seed: int = 0, tokenizer: bool = True, **config) -> tuple:
    """(directory, transformers model, tokenizer length) of a tiny random AR model of `family`. Every norm weight
    and bias is perturbed, so that a missing mapping cannot hide behind ones and zeros."""
    import transformers

    os.makedirs(directory, exist_ok=True)
    n_tok = write_tokenizer(directory) if tokenizer else 260  # rows of the model (>= the tokenizer's length)
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config_class, model_class = classes[family]
    fields = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=n_tok + extra_rows, rms_norm_eps=1e-5, bos_token_id=1,
                  eos_token_id=2, max_position_embeddings=256, tie_word_embeddings=tied, rope_theta=1000.0)
    if family == "mistral":
        fields["sliding_window"] = None
    fields.update(config)
    torch.manual_seed(seed)
    model = model_class(config_class(**fields)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model = model.to(dtype)
    kwargs = {} if shard_size is None else {"max_shard_size": shard_size}
    model.save_pretrained(directory, **kwargs)
    if tokenizer:  # the length as loaded from the model directory (its model_type may pick the tokenizer class)
        from transformers import AutoTokenizer

        n_tok = len(AutoTokenizer.from_pretrained(directory))
    return directory, model, n_tok


def ar_logits(model, ids: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    """float32 logits of the transformers model (its own positions: left-padded rows count from the first
    real token, as this project's positions do)."""
    with torch.no_grad():
        kwargs = {}
        if mask is not None:
            m = torch.tensor(mask)
            kwargs = dict(attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0))
        return model(torch.tensor(ids), **kwargs).logits.float().numpy()


def edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        d = json.load(f)
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    with open(path, "w") as f:
        json.dump(d, f)
