"""`build_bpe_tokenizer`: a byte-level BPE tokenizer trained offline, saved as a normal HF tokenizer directory.

The LLaDA special tokens take the top ids, in this order: `<|start_header_id|>` V-6, `<|end_header_id|>` V-5,
`<|eot_id|>` V-4, `<|startoftext|>` (BOS) V-3, `<|endoftext|>` (EOS and pad) V-2, `<|mdm_mask|>` (mask) V-1. With
the default V = 512 these are exactly the ids of `LLaDAConfig.tiny()` (bos 509, eos/pad 510, mask 511), so the
tiny model fits the tiny tokenizer as it is. Tests and the demo use it: nothing is downloaded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from llada_jax.checkpoints.atomic import atomic_dir, write_json
from llada_jax.tokenizer import (
    BOS_TOKEN,
    EOS_TOKEN,
    LLADA_CHAT_TEMPLATE,
    LLADA_SPECIAL_TOKENS,
    MASK_TOKEN,
    TokenizerHelper,
)


def build_bpe_tokenizer(texts: Iterable[str] | None, out_dir: str, *, files: list[str] | None = None,
                        vocab_size: int = 512, min_frequency: int = 2) -> TokenizerHelper:
    """Train a byte-level BPE tokenizer on `texts` (and/or text `files`) and save it as an HF directory.

    The vocabulary has exactly `vocab_size` ids: the 256 bytes, learned merges, `<|reserved_token_N|>`
    fillers when the corpus supports fewer merges, and the LLaDA special tokens at the top (see the module
    docstring). The chat template is LLaDA's. Written to a temporary directory and renamed into place.
    Returns the loaded `TokenizerHelper`.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    n_special = len(LLADA_SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least {256 + n_special}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - n_special, min_frequency=min_frequency,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
                                  show_progress=False)
    corpus = list(texts or [])
    for path in files or []:
        with open(path, encoding="utf-8") as f:
            corpus.extend(f.read().splitlines())
    if not corpus:
        raise ValueError("build_bpe_tokenizer: the corpus is empty")
    tok.train_from_iterator(corpus, trainer=trainer)
    filler = vocab_size - n_special - tok.get_vocab_size()
    if filler:
        tok.add_special_tokens([AddedToken(f"<|reserved_token_{i}|>", special=True, normalized=False)
                                for i in range(filler)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLADA_SPECIAL_TOKENS])
    assert tok.get_vocab_size() == vocab_size and tok.token_to_id(MASK_TOKEN) == vocab_size - 1
    # A raw prompt encoded with special tokens starts with BOS, as with the official LLaDA tokenizer (the
    # pipeline and the chat template encode without them).
    bos = tok.token_to_id(BOS_TOKEN)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B",
                                                       special_tokens=[(BOS_TOKEN, bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
                                 pad_token=EOS_TOKEN, mask_token=MASK_TOKEN)
    hf.chat_template = LLADA_CHAT_TEMPLATE

    with atomic_dir(out_dir, overwrite=True) as tmp:
        hf.save_pretrained(tmp)
        _portable_tokenizer_class(tmp)
    return TokenizerHelper(out_dir)


def _portable_tokenizer_class(directory: str) -> None:
    # transformers 5 writes its internal class name and puts the chat template in chat_template.jinja; older
    # releases (the package supports >= 4.46) know the class as PreTrainedTokenizerFast (which transformers 5
    # also loads) and read the template from tokenizer_config.json.
    path = os.path.join(directory, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["chat_template"] = LLADA_CHAT_TEMPLATE  # older releases read it here, not from chat_template.jinja
    write_json(path, cfg)
