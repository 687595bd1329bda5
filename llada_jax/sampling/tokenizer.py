"""The tokenizer of a model, as the sampling commands use it (a thin adapter over a Hugging Face tokenizer).

`load_tokenizer(model_path)` is the one place a tokenizer is loaded; the other functions are the four
operations the commands need, so another tokenizer class can be swapped in here alone.
"""

from __future__ import annotations

EOT_TOKEN = "<|eot_id|>"


def load_tokenizer(model_path: str):
    """The tokenizer stored with a model (Orbax run or HF directory), or None when there is none."""
    from llada_jax.train.checkpoint import tokenizer_path

    directory = tokenizer_path(model_path)
    if directory is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def encode_text(tokenizer, text: str) -> list[int]:
    """A raw prompt (base models): the tokenizer's own special tokens (e.g. BOS) are added."""
    return list(tokenizer(text)["input_ids"])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation through the chat template, ending with the assistant's generation prompt."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def decode(tokenizer, ids) -> str:
    return tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)


def eot_id(tokenizer) -> int | None:
    """The id of `<|eot_id|>` (end of turn), if the tokenizer has it."""
    if tokenizer is None:
        return None
    token = tokenizer.convert_tokens_to_ids(EOT_TOKEN)
    return token if isinstance(token, int) and token != tokenizer.unk_token_id else None
