"""`TokenizerHelper` around any local Hugging Face tokenizer: the LLaDA special ids and chat template.

`TokenizerHelper(path)` loads a tokenizer directory with `AutoTokenizer` (`local_files_only`: nothing is
downloaded) and exposes encode/decode, the special ids LLaDA needs (mask, EOS, BOS, `<|start_header_id|>`,
`<|end_header_id|>`, `<|eot_id|>`) and the chat template. A tokenizer without a chat template gets LLaDA's
(`LLADA_CHAT_TEMPLATE`): BOS once, then per message
`<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>` (content stripped of surrounding
whitespace, as in the official GSAI-ML/LLaDA-8B-Instruct template), then
`<|start_header_id|>assistant<|end_header_id|>\\n\\n` as the generation prompt.

`config_overrides(helper)` gives the LLaDAConfig fields that fit a tokenizer and `check_compatible(helper,
model_config)` says what does not. (`llada_jax.data.bpe.build_bpe_tokenizer` trains a small one offline.)
"""

from __future__ import annotations

import os

MASK_TOKEN = "<|mdm_mask|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
EOT = "<|eot_id|>"
# Added at the top of the vocabulary, in this order (the last one gets id vocab_size - 1).
LLADA_SPECIAL_TOKENS = (START_HEADER, END_HEADER, EOT, BOS_TOKEN, EOS_TOKEN, MASK_TOKEN)

LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


class TokenizerHelper:
    """A local HF tokenizer plus the LLaDA special ids and chat template.

    `mask_token_id` (and the other ids) are looked up by token text when the tokenizer does not declare
    them (the official LLaDA tokenizer names no mask token; its mask is the added token `<|mdm_mask|>`);
    pass an id to override. A missing id is None. The helper pickles as its path (worker processes
    reload it).
    """

    def __init__(self, name_or_path: str, *, mask_token_id: int | None = None):
        from transformers import AutoTokenizer

        self.path = name_or_path
        self._mask_override = mask_token_id
        if not os.path.isdir(name_or_path):
            raise FileNotFoundError(
                f"tokenizer {name_or_path!r}: not a local directory (tokenizers are loaded offline; download "
                f"it first, e.g. with `huggingface-cli download`, and pass the directory)")
        try:
            # trust_remote_code=False: an HF model directory's config.json names custom modeling code in its
            # auto_map, and transformers 5 would otherwise ask on stdin whether to run it; a tokenizer needs none
            self.tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a broken directory
            raise ValueError(f"tokenizer {name_or_path!r}: cannot be loaded: {e}") from e
        tok = self.tokenizer
        self.mask_token_id = mask_token_id if mask_token_id is not None else (
            tok.mask_token_id if tok.mask_token_id is not None else self.token_id(MASK_TOKEN))
        self.eos_token_id = tok.eos_token_id if tok.eos_token_id is not None else self.token_id(EOS_TOKEN)
        self.bos_token_id = tok.bos_token_id if tok.bos_token_id is not None else self.token_id(BOS_TOKEN)
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_token_id
        self.start_header_id = self.token_id(START_HEADER)
        self.end_header_id = self.token_id(END_HEADER)
        self.eot_id = self.token_id(EOT)
        self.chat_template = tok.chat_template or LLADA_CHAT_TEMPLATE

    @property
    def declares_chat_template(self) -> bool:
        """Whether the tokenizer directory has a chat template of its own (else LLaDA's is used)."""
        return bool(self.tokenizer.chat_template)

    def __getstate__(self):
        return {"path": self.path, "mask_token_id": self._mask_override}

    def __setstate__(self, state):
        self.__init__(state["path"], mask_token_id=state["mask_token_id"])

    def __len__(self) -> int:
        return len(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary plus added tokens)."""
        return len(self.tokenizer)

    def token_id(self, token: str) -> int | None:
        """The id of a token given by its text (e.g. '<|eot_id|>'), or None if the vocabulary lacks it."""
        tid = self.tokenizer.convert_tokens_to_ids(token)
        unk = self.tokenizer.unk_token_id
        return None if tid is None or (unk is not None and tid == unk and token != self.tokenizer.unk_token) else tid

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. By default no BOS/EOS is added (the chat template and the pipeline add them)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids, *, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` ([{'role', 'content'}, ...]) as text."""
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=add_generation_prompt)

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat (the template writes BOS itself; nothing else is added)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

    def special_ids(self) -> dict[str, int | None]:
        return {"mask": self.mask_token_id, "eos": self.eos_token_id, "bos": self.bos_token_id,
                "pad": self.pad_token_id, "start_header": self.start_header_id,
                "end_header": self.end_header_id, "eot": self.eot_id}

    def __repr__(self) -> str:
        return f"TokenizerHelper({self.path!r}, vocab {len(self)}, mask {self.mask_token_id}, eos {self.eos_token_id})"


def load_tokenizer(tokenizer: "str | TokenizerHelper | None") -> "TokenizerHelper | None":
    if tokenizer is None or tokenizer == "":
        return None
    return tokenizer if isinstance(tokenizer, TokenizerHelper) else TokenizerHelper(tokenizer)


# ----------------------------------------------------------------------------------------------------
# Model config <-> tokenizer
# ----------------------------------------------------------------------------------------------------

def config_overrides(helper: TokenizerHelper, *, pad_to_multiple_of: int = 1) -> dict[str, int]:
    """LLaDAConfig fields that fit `helper`: vocab_size (len(tokenizer) rounded up) and the special ids.

    `LLaDAConfig.tiny(**config_overrides(helper))` builds a model for the tokenizer. The official LLaDA-8B
    tokenizer has 126,349 ids; with pad_to_multiple_of=128 this gives the model's 126,464.
    """
    if helper.mask_token_id is None:
        raise ValueError(f"{helper.path}: the tokenizer has no mask token ({MASK_TOKEN}); pass mask_token_id")
    if helper.eos_token_id is None:
        raise ValueError(f"{helper.path}: the tokenizer has no EOS token")
    n = len(helper)
    vocab = -(-n // pad_to_multiple_of) * pad_to_multiple_of
    out = {"vocab_size": vocab, "mask_token_id": helper.mask_token_id, "eos_token_id": helper.eos_token_id,
           "pad_token_id": helper.pad_token_id}
    if helper.bos_token_id is not None:
        out["bos_token_id"] = helper.bos_token_id
    return out


def check_compatible(helper: TokenizerHelper, model_config) -> None:
    """Raise ValueError listing every way the tokenizer does not fit the model config (ids, vocabulary)."""
    problems = []
    if len(helper) > model_config.padded_vocab_size:
        problems.append(f"the tokenizer has {len(helper)} ids but the model's vocabulary is "
                        f"{model_config.padded_vocab_size}")
    for name in ("mask_token_id", "eos_token_id"):
        ours, theirs = getattr(helper, name), getattr(model_config, name)
        if ours != theirs:
            problems.append(f"{name}: tokenizer {ours}, model {theirs}")
    if helper.bos_token_id is not None and helper.bos_token_id != model_config.bos_token_id:
        problems.append(f"bos_token_id: tokenizer {helper.bos_token_id}, model {model_config.bos_token_id}")
    if problems:
        raise ValueError(f"tokenizer {helper.path} does not fit the model config: " + "; ".join(problems)
                         + " (llada_jax.tokenizer.config_overrides gives fitting fields)")
