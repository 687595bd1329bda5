"""The sampler's options: the method, remasking and cache names, `SamplerOptions`, and the block layout.

This module imports no JAX, so a command-line parser can take its choices from here cheaply. Every name
below is the one definition; the CLI, the demo and the samplers read them from here.
"""

from __future__ import annotations

import dataclasses
import math

# The methods of a bidirectional (LLaDA) or causal model, and those of a block_causal (block diffusion) model:
# the attention a model was trained with decides which it can be sampled with (`SamplerOptions.resolved`).
# block_diffusion lays the blocks from the prompt's end (this project's SFT); llada2 from position 0, as LLaDA 2.x's
# published generate() (and its training) does, so the first block holds the prompt's tail.
METHODS = ("fixed_length", "semi_ar_padding", "semi_ar_origin")
BLOCK_METHODS = ("block_diffusion", "llada2")
# LLaDA 2.x's generate(): threshold 0.95 (llada2's default); 2.1's token editing: editing_threshold 0.9 and
# max_post_steps 16 (its defaults; the editing threshold is off unless given).
LLADA2_THRESHOLD = 0.95
MAX_POST_STEPS = 16
REMASKING = ("low_confidence", "random")
CACHES = ("none", "prefix", "dual")
# <|eot_id|> of the official LLaDA-8B tokenizer; used by `confidence_eos_eot_inf` when the model has that
# vocabulary and no eot_id is given.
LLADA_8B_EOT_ID = 126348
LLADA_8B_MASK_ID = 126336


@dataclasses.dataclass(frozen=True)
class BlockLayout:
    """How `gen_length` generated positions and `steps` denoising steps split into blocks: blocks of
    `block_length` are decoded left to right, with the step budget split evenly among them."""

    gen_length: int
    block_length: int
    steps: int

    @property
    def num_blocks(self) -> int:
        return self.gen_length // self.block_length

    @property
    def steps_per_block(self) -> int:
        return self.steps // self.num_blocks

    @property
    def max_transfer(self) -> int:
        """The largest k any step can ask for (a block holds at most block_length masks)."""
        return max(1, -(-self.block_length // self.steps_per_block))

    @classmethod
    def checked(cls, gen_length: int, block_length: int, steps: int) -> "BlockLayout":
        """Validate the three sizes (as the official sampler asserts), naming the offending field."""
        for name, value in (("gen_length", gen_length), ("block_length", block_length), ("steps", steps)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if gen_length % block_length:
            raise ValueError(f"gen_length {gen_length} is not divisible by block_length {block_length}")
        num_blocks = gen_length // block_length
        if steps % num_blocks:
            raise ValueError(f"steps {steps} is not divisible by the number of blocks {num_blocks} "
                             f"(gen_length {gen_length} / block_length {block_length})")
        return cls(gen_length, block_length, steps)


def prompt_bucket(length: int, gen_length: int, max_length: int) -> int:
    """The length a prompt of `length` tokens is left-padded to. The whole sequence (prompt + gen_length), which
    is what a step costs, is rounded up to a multiple of 64 positions, or of a quarter of its next power of two
    above 256: 4 compiled shapes per doubling of the length, at most 1/4 more positions (and at most 63 below
    256); never past `max_length` (the model's max_sequence_length).

    Measured on a 2-core CPU (d_model 256, gen_length 128, batch 1): 32 more prompt positions cost 2% of a call
    with the dual cache and 12% without a cache, while compiling a new shape costs one to two calls, which an
    application sampling one prompt at a time would pay for every new prompt length without buckets."""
    total = length + gen_length
    step = max(64, (1 << (total - 1).bit_length()) // 4)
    return max(length, min(-(-total // step) * step, max_length) - gen_length)


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
    """One sampler configuration (hashable: it is a static argument of the jitted program)."""

    method: str = "semi_ar_padding"
    gen_length: int = 128
    block_length: int = 32  # fixed_length ignores it; the block methods use the model's block_size instead
    steps: int = 128
    temperature: float = 0.0
    cfg_scale: float = 0.0
    remasking: str = "low_confidence"
    mask_id: int | None = None  # None: model.config.mask_token_id
    eos_id: int | None = None  # None: model.config.eos_token_id
    eot_id: int | None = None  # end of turn, for confidence_eos_eot_inf (None: 126348 for the LLaDA-8B vocab)
    logits_eos_inf: bool = False  # never predict EOS (its logit is -inf)
    confidence_eos_eot_inf: bool = False  # EOS / EOT predictions get the lowest confidence (Appendix B.4)
    threshold: float | None = None  # parallel decoding: commit every masked position with confidence >= this
    # (llada2: None is its published 0.95)
    # LLaDA 2.1 token editing (block methods, with a threshold): a committed token of the current block is replaced
    # by the step's prediction when that differs and its probability is above this; None: off (LLaDA 2.0)
    editing_threshold: float | None = None
    max_post_steps: int = MAX_POST_STEPS  # with editing: steps a block may take once it has no mask left
    cache: str | None = None  # KV cache: none | prefix | dual; None: prefix for the block methods, else none
    cache_refresh: int = 0  # with a cache, a full forward (cache refresh) every this many steps; 0: block starts
    # Left-pad prompts to a bucket length (`prompt_bucket`), so that calls with other prompt lengths reuse the
    # compiled programs of a few shapes; False: compile for each prompt length as given.
    prompt_buckets: bool = True

    def __post_init__(self):
        if self.method not in METHODS + BLOCK_METHODS:
            raise ValueError(f"method: unknown sampling method {self.method!r}; "
                             f"expected one of {list(METHODS + BLOCK_METHODS)}")
        if self.remasking not in REMASKING:
            raise ValueError(f"remasking: unknown remasking strategy {self.remasking!r}; "
                             f"expected one of {list(REMASKING)}")
        if self.method in BLOCK_METHODS:  # the blocks are the model's: checked by `resolved`
            BlockLayout.checked(self.gen_length, self.gen_length, self.steps)  # positive sizes
        else:
            self.layout  # validates gen_length / block_length / steps
        for name in ("temperature", "cfg_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                    or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("mask_id", "eos_id", "eot_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative token id, got {value!r}")
        if self.threshold is None and self.method == "llada2":  # frozen: its published default, once, here
            object.__setattr__(self, "threshold", LLADA2_THRESHOLD)
        value = self.threshold
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value < 0):
            raise ValueError(f"threshold must be a finite number >= 0 (or None: the step schedule), got {value!r}")
        self._check_editing()
        if self.cache is None:  # frozen: the method's default cache is filled in once, here
            object.__setattr__(self, "cache", "prefix" if self.method in BLOCK_METHODS else "none")
        if self.cache not in CACHES:
            raise ValueError(f"cache: unknown cache {self.cache!r}; expected one of {list(CACHES)}")
        if not isinstance(self.prompt_buckets, bool):
            raise ValueError(f"prompt_buckets must be True or False, got {self.prompt_buckets!r}")
        value = self.cache_refresh
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"cache_refresh must be an integer >= 0 (0: refresh at block starts only), got {value!r}")
        if self.method in BLOCK_METHODS:
            # Its cache is exact (a finished block's keys and values never change): nothing after the block to
            # keep (dual) and nothing to refresh.
            if self.cache == "dual":
                raise ValueError(f"cache: {self.method}'s positions after the block are invisible, so it has no "
                                 f"dual cache; use prefix (the exact cache, its default) or none")
            if self.cache_refresh:
                raise ValueError(f"cache_refresh must be 0 with {self.method} (its cache is exact: nothing to "
                                 f"refresh), got {value!r}")

    def _check_editing(self) -> None:
        value = self.max_post_steps
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"max_post_steps must be an integer >= 0, got {value!r}")
        value = self.editing_threshold
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise ValueError(f"editing_threshold must be a probability in [0, 1] (or None: no editing), got {value!r}")
        if self.method not in BLOCK_METHODS:
            raise ValueError(f"editing_threshold: token editing (LLaDA 2.1) runs in the block-diffusion methods "
                             f"{list(BLOCK_METHODS)} on a block_causal model, not in {self.method}")
        if self.threshold is None:
            raise ValueError("editing_threshold: token editing runs with threshold decoding (LLaDA 2.1's joint "
                             "threshold); pass a threshold")
        if self.remasking != "low_confidence":
            raise ValueError(f"editing_threshold: an edit is scored by the probability of the predicted token, so it "
                             f"needs remasking 'low_confidence', not {self.remasking!r}")

    @property
    def post_steps(self) -> int:
        """The steps a block may take once it has no mask left: max_post_steps with editing, else none."""
        return self.max_post_steps if self.editing_threshold is not None else 0

    @property
    def layout(self) -> BlockLayout:
        """The blocks (for the block methods, of the options `resolved` on a model: its block_size). llada2's
        blocks are laid from position 0, so the first one holds up to block_length - 1 tokens of the prompt: its
        generated region (`BlockLayout.gen_length`) is gen_length + block_length - 1 rounded up to whole blocks, of
        which each row decodes the blocks that hold its gen_length answer positions."""
        block = self.gen_length if self.method == "fixed_length" else self.block_length
        if self.method == "fixed_length" and not (isinstance(block, int) and block > 0):
            block = self.block_length  # let BlockLayout name the bad gen_length
        gen, steps = self.gen_length, self.steps
        sizes = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (block, gen))
        if self.method == "llada2" and sizes:
            gen = -(-(gen + block - 1) // block) * block
        if self.threshold is not None and sizes:
            # steps are not used: at most one step per token, and with editing the block's post steps
            steps = max(1, gen // block) * (block + self.post_steps)
        return BlockLayout.checked(gen, block, steps)

    def resolved(self, config) -> "SamplerOptions":
        """These options with the token ids filled in from a model config, and checked against its vocab."""
        mask_id = config.mask_token_id if self.mask_id is None else self.mask_id
        eos_id = config.eos_token_id if self.eos_id is None else self.eos_id
        eot_id = self.eot_id
        if eot_id is None and self.confidence_eos_eot_inf and mask_id == LLADA_8B_MASK_ID \
                and config.padded_vocab_size > LLADA_8B_EOT_ID:
            eot_id = LLADA_8B_EOT_ID
        vocab = config.padded_vocab_size
        for name, value in (("mask_id", mask_id), ("eos_id", eos_id), ("eot_id", eot_id)):
            if value is not None and not 0 <= value < vocab:
                raise ValueError(f"{name} {value} is outside the model's vocabulary [0, {vocab})")
        if mask_id is None:
            raise ValueError("mask_id: the model config has no mask_token_id; pass mask_id")
        if eos_id is None and (self.method in ("semi_ar_origin",) + BLOCK_METHODS or self.logits_eos_inf
                               or self.confidence_eos_eot_inf):
            raise ValueError("eos_id: the model config has no eos_token_id; pass eos_id")
        resolved = dataclasses.replace(self, mask_id=mask_id, eos_id=eos_id, eot_id=eot_id,
                                       block_length=self._block_length(config),
                                       temperature=float(self.temperature), cfg_scale=float(self.cfg_scale),
                                       threshold=None if self.threshold is None else float(self.threshold),
                                       editing_threshold=None if self.editing_threshold is None
                                       else float(self.editing_threshold))
        resolved.layout  # block_diffusion: the model's blocks against steps
        return resolved

    def _block_length(self, config) -> int:
        """The block length on this model; a method the model's attention cannot be sampled with is an error."""
        attention = config.attention_type
        if self.method in BLOCK_METHODS and attention != "block_causal":
            raise ValueError(f"method: {self.method} samples a block-diffusion model (attention_type "
                             f"'block_causal' with a block_size); this model's attention_type is {attention!r}: "
                             f"use one of {list(METHODS)}")
        if attention == "block_causal" and self.method not in BLOCK_METHODS:
            raise ValueError(f"method: {self.method} cannot sample a block_causal model (block_size "
                             f"{config.block_size}: a position sees only its own and earlier blocks, so the "
                             f"answer must be decoded block by block): use method 'block_diffusion' (blocks from "
                             f"the prompt's end) or 'llada2' (blocks from position 0, as LLaDA 2.x)")
        if self.method not in BLOCK_METHODS:
            return self.block_length
        # The model was trained with these blocks: they are the decoding blocks (block_length is not used).
        if self.method == "block_diffusion" and self.gen_length % config.block_size:
            raise ValueError(f"gen_length {self.gen_length} is not a multiple of the model's block_size "
                             f"{config.block_size} (block_diffusion decodes whole blocks)")
        return config.block_size

    @property
    def needs_rng(self) -> bool:
        return self.temperature > 0 or self.remasking == "random"

    @property
    def evaluations_per_step(self) -> int:
        """Network evaluations one step spends on a row: CFG evaluates the conditional and the unconditional
        sequence."""
        return 2 if self.cfg_scale > 0 else 1

    @property
    def confidence_excluded_ids(self) -> tuple[int, ...]:
        """The token ids removed from the confidence softmax (`confidence_eos_eot_inf`)."""
        if not self.confidence_eos_eot_inf:
            return ()
        return tuple(t for t in (self.eos_id, self.eot_id) if t is not None)
