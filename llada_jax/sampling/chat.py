"""Terminal inference: one prompt (`--prompt`) or a multi-turn chat (`--interactive`).

A chat keeps the conversation as messages and renders all of it with the chat template every turn (the
template puts BOS once at the start). The answer is the decoded generated tokens (special tokens, i.e. the
end-of-turn and EOS padding, dropped). Without a chat template (base models, or `--no_chat_template`) a
prompt is sent as raw text and every turn stands alone.
"""

from __future__ import annotations

import os
import sys

import jax

from llada_jax import distributed, sharding
from llada_jax.config import padding_token_id
from llada_jax.sampling import prompts as prompt_io

COMMANDS = "commands: /reset clears the conversation, /exit (or Ctrl-D) quits"


class Chat:
    def __init__(self, model, tokenizer, sampler, *, use_template: bool, seed: int = 0):
        self.model, self.tokenizer, self.sampler = model, tokenizer, sampler
        self.use_template = use_template
        self.key = jax.random.key(seed)
        self.turn = 0
        self.messages: list[dict] = []

    def reset(self) -> None:
        self.messages = []

    def reply(self, text: str) -> tuple[str, int]:
        """(answer, nfe) to the user's `text`; the exchange is added to the conversation."""
        messages = self.messages + [{"role": "user", "content": text}]
        if self.use_template:
            ids = self.tokenizer.apply_chat_template(messages)
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=True)
        config, gen_length = self.model.config, self.sampler.options.gen_length
        limit = config.max_sequence_length - gen_length
        if len(ids) > limit:
            raise ValueError(f"the prompt has {len(ids)} tokens; with gen_length {gen_length} at most {limit} fit "
                             f"the model's max_sequence_length {config.max_sequence_length}")
        length = prompt_io.padded_length(len(ids), prompt_io.LENGTH_BUCKET, limit)
        prompt, mask = prompt_io.left_pad([ids], padding_token_id(config), length)
        out, stats = self.sampler(self.model, prompt, mask, rng=jax.random.fold_in(self.key, self.turn)[None],
                                  return_stats=True)
        self.turn += 1
        answer = self.tokenizer.decode(sharding.fetch(out)[0, length:], skip_special_tokens=True)
        if self.use_template:
            self.messages = messages + [{"role": "assistant", "content": answer}]
        return answer, int(sharding.fetch(stats.nfe)[0])


def interactive(chat: Chat, *, stdin=None, stdout=None) -> int:
    """The terminal chat. In a multi-process run process 0 reads the terminal and prints; every process samples
    (each line read is given to all)."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    if jax.process_index() != 0:
        stdout = open(os.devnull, "w")
    opts = chat.sampler.options
    print(f"LLaDA chat: {opts.method}, {opts.remasking}, gen_length {opts.gen_length}, steps {opts.steps}, "
          f"block_length {opts.layout.block_length}. {COMMANDS}", file=stdout, flush=True)
    while True:
        print("You: ", end="", file=stdout, flush=True)
        line = distributed.on_main(stdin.readline)
        if not line:
            print(file=stdout)
            return 0
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit", "exit", "quit"):
            return 0
        if text == "/reset":
            chat.reset()
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        try:
            answer, nfe = chat.reply(text)
        except ValueError as e:
            print(f"(error: {e}; /reset starts a new conversation)", file=stdout, flush=True)
            continue
        print(f"LLaDA: {answer}", file=stdout, flush=True)
