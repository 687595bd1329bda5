"""A tiny byte-level BPE tokenizer with the LLaDA special tokens and chat template, built offline in a second."""

from __future__ import annotations

SPECIALS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|startoftext|>", "<|endoftext|>",
            "<|mdm_mask|>")

# BOS once, then <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|> per message, then the
# assistant header as the generation prompt (the LLaDA-8B-Instruct layout).
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Lily can run 12 kilometers per hour for 4 hours.",
    "A masked diffusion model predicts every masked token at once.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello there, how are you today? I am fine, thank you.",
] * 4


def build(out_dir: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator(TEXTS, trainer)
    core.add_special_tokens(list(SPECIALS))  # appended after the BPE vocabulary, in this order
    bos = core.token_to_id("<|startoftext|>")
    core.post_processor = processors.TemplateProcessing(single="<|startoftext|> $A",
                                                        special_tokens=[("<|startoftext|>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", mask_token="<|mdm_mask|>",
                                   additional_special_tokens=["<|start_header_id|>", "<|end_header_id|>",
                                                              "<|eot_id|>"])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def model_config_fields(tokenizer) -> dict:
    """LLaDAConfig fields that make a tiny model fit this tokenizer."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIALS}
    return dict(vocab_size=len(tokenizer), mask_token_id=ids["<|mdm_mask|>"], eos_token_id=ids["<|endoftext|>"],
                pad_token_id=ids["<|endoftext|>"], bos_token_id=ids["<|startoftext|>"])
