"""Record formats: JSON (or TFDS) records -> validated token arrays for pretraining and SFT.

Pretraining records are `{"input_ids": [...]}` or `{"text": "..."}` (tokenized with the configured tokenizer,
no special tokens added). `PretrainFormat` returns a `Document` whose tokens end with one EOS (appended unless
the record already ends with it): the separator of the concat mode and the first pad of the pad mode.

SFT records are `{"input_ids": [...], "prompt_length": N}`, Alpaca `{"instruction", "input", "output"}`, ShareGPT
`{"conversations": [{"from": "human"|"user"|"gpt"|"assistant"|"system", "value": "..."}]}` or OpenAI style
`{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`. A chat yields one example per
assistant turn: the prompt is the chat template applied to all earlier turns with the generation prompt
(`...<|start_header_id|>assistant<|end_header_id|>\\n\\n`), the answer is the turn's content (stripped, as the
template strips it) followed by `<|eot_id|>` (when the tokenizer has it), tokenized on its own: the tokens a
sampler should produce after that prompt. `SftFormat` returns `Examples` (unpadded; the batcher pads with EOS).

Every check names the record (file and line) and the field: malformed JSON, a record that is not an object,
missing or mistyped fields, ids that are not integers, negative or outside the vocabulary, the mask token
in clean data, prompt_length outside (0, len), unknown roles, no assistant turn. With `skip_invalid` a bad
record becomes `Skipped` (an `invalid` event) instead of a `DataError`. SFT examples longer than max_length
follow `too_long`: `error`, `skip` (a `too_long` event) or `truncate_prompt` (prompt tokens dropped from the
left, after a leading BOS, which is kept; a `truncated` event). The answer is never cut: an answer that does
not fit even with a one-token prompt is an error.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from llada_jax.data.skips import INVALID, TOO_LONG, TRUNCATED, Skip
from llada_jax.data.sources import RawRecord
from llada_jax.errors import DataError, TokenizerRequired

PRETRAIN_MODES = ("concat", "pad")
TOO_LONG_POLICIES = ("error", "skip", "truncate_prompt")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclasses.dataclass
class Document:
    """A pretraining document: int32 tokens ending with EOS; `source_length` tokens came from the record."""

    tokens: np.ndarray
    source_length: int
    events: tuple = ()


@dataclasses.dataclass
class Examples:
    """SFT examples of one record: prompt + answer ids (unpadded) and prompt lengths, one per example."""

    ids: list
    prompt_lengths: tuple
    events: tuple = ()


@dataclasses.dataclass
class Skipped:
    """A record left out (skip_invalid); `events` says where and why."""

    events: tuple


def _register_pytrees() -> None:
    # Grain worker processes send elements to the main process through a pipe, except numpy arrays found
    # by walking the element as a JAX pytree, which travel through shared memory. Registered, a document's
    # tokens take that path: faster, and no large pickles left in the pipe when the iterator closes (those
    # make a worker outlive close() until Grain kills it after 25 s).
    from jax import tree_util

    tree_util.register_dataclass(Document, data_fields=["tokens"], meta_fields=["source_length", "events"])
    tree_util.register_dataclass(Examples, data_fields=["ids"], meta_fields=["prompt_lengths", "events"])
    tree_util.register_dataclass(Skipped, data_fields=[], meta_fields=["events"])


_register_pytrees()


# ----------------------------------------------------------------------------------------------------
# Field checks
# ----------------------------------------------------------------------------------------------------

def json_type(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, np.integer)):
        return "integer"
    if isinstance(value, (float, np.floating)):
        return "number"
    if isinstance(value, (str, bytes)):
        return "string"
    if isinstance(value, (list, tuple, np.ndarray)):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def decode_record(rec: RawRecord) -> dict:
    """The record as a dict: JSON bytes parsed (errors name the line and column), TFDS dicts as they are."""
    data = rec.data
    if isinstance(data, (bytes, str)):
        try:
            obj = json.loads(data)
        except json.JSONDecodeError as e:
            raise DataError(rec.where, "", f"malformed JSON: {e.msg} (column {e.colno})") from None
        except UnicodeDecodeError as e:
            raise DataError(rec.where, "", f"not UTF-8 text: {e.reason} at byte {e.start}") from None
    else:
        obj = data
    if not isinstance(obj, dict):
        raise DataError(rec.where, "", f"expected a JSON object, got {json_type(obj)}")
    return obj


def token_array(value, field: str, where: str, *, vocab_size: int | None, mask_token_id: int | None,
                raw: bytes | None = None) -> np.ndarray:
    """`value` (a list of token ids) as int32, after checking every id; errors name the field and position."""
    if isinstance(value, np.ndarray):
        arr = value
    elif isinstance(value, (list, tuple)):
        # JSON booleans would silently become 0/1 in a mixed list: look for them only when the raw line
        # mentions true/false (a fast substring test keeps the common path vectorised).
        if raw is None or b"true" in raw or b"false" in raw:
            for i, x in enumerate(value):
                if isinstance(x, bool):
                    raise DataError(where, field, f"position {i}: {json.dumps(x)} is not a token id")
        try:
            arr = np.asarray(value)
        except (ValueError, OverflowError, TypeError):
            arr = np.asarray(value, dtype=object) if all(not isinstance(x, (list, dict)) for x in value) else None
            if arr is None:
                raise DataError(where, field, "expected a flat list of integer token ids") from None
    else:
        raise DataError(where, field, f"expected a list of token ids, got {json_type(value)}")
    if arr.ndim != 1:
        raise DataError(where, field, "expected a flat list of integer token ids, got nested lists")
    if arr.size == 0:
        raise DataError(where, field, "is empty")
    if arr.dtype.kind not in "iu":
        items = list(value) if isinstance(value, (list, tuple)) else arr.tolist()
        for i, x in enumerate(items):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
                shown = json.dumps(x) if _jsonable(x) else repr(x)
                raise DataError(where, field, f"position {i}: {shown} ({json_type(x)}) is not an integer token id")
        # Only integers, some too large for int64 (numpy keeps them as Python objects).
        i = next(i for i, x in enumerate(items) if not -2**63 <= x < 2**63)
        raise DataError(where, field, f"position {i}: {items[i]} is not a valid token id (out of range)")
    lo = int(arr.min())
    if lo < 0:
        i = int(np.argmax(arr < 0))
        raise DataError(where, field, f"position {i}: negative token id {int(arr[i])}")
    hi = int(arr.max())
    if vocab_size is not None and hi >= vocab_size:
        i = int(np.argmax(arr >= vocab_size))
        raise DataError(where, field, f"position {i}: id {int(arr[i])} is outside the vocabulary (size {vocab_size})")
    if hi > np.iinfo(np.int32).max:
        i = int(np.argmax(arr > np.iinfo(np.int32).max))
        raise DataError(where, field, f"position {i}: {int(arr[i])} is not a valid token id (out of range)")
    if mask_token_id is not None:
        hits = arr == mask_token_id
        if hits.any():
            i = int(np.argmax(hits))
            raise DataError(where, field, f"position {i}: the mask token {mask_token_id} inside clean data "
                                          "(masks come from the noising process, never from the data)")
    return arr.astype(np.int32, copy=False)


def _jsonable(x) -> bool:
    return x is None or isinstance(x, (str, int, float, bool, list, dict))


def text_field(value, field: str, where: str) -> str:
    if isinstance(value, bytes):  # TFDS Text features arrive as bytes
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(where, field, f"not UTF-8 text: {e.reason}") from None
    if not isinstance(value, str):
        raise DataError(where, field, f"expected a string, got {json_type(value)}")
    return value


def _require_tokenizer(helper, what: str, where: str):
    if helper is None:
        # A configuration problem, not a bad record: never skipped.
        raise TokenizerRequired(f"{where}: {what} records need a tokenizer (set data.tokenizer / --tokenizer to an "
                                "HF tokenizer directory)")
    return helper


class _Format:
    """Shared set-up: vocabulary limits, special ids, a lazily loaded tokenizer, the skip_invalid switch."""

    def __init__(self, *, vocab_size: int | None, mask_token_id: int | None, eos_token_id: int | None,
                 bos_token_id: int | None = None, tokenizer=None, skip_invalid: bool = False):
        self.vocab_size, self.mask_token_id, self.eos_token_id = vocab_size, mask_token_id, eos_token_id
        self.bos_token_id = bos_token_id
        self.skip_invalid = skip_invalid
        self._tokenizer = tokenizer  # a path, a TokenizerHelper, or None

    @property
    def tokenizer(self):
        if isinstance(self._tokenizer, str) and self._tokenizer:
            from llada_jax.tokenizer import TokenizerHelper

            self._tokenizer = TokenizerHelper(self._tokenizer)
        return self._tokenizer or None

    def ids(self, value, field: str, where: str, raw=None) -> np.ndarray:
        return token_array(value, field, where, vocab_size=self.vocab_size, mask_token_id=self.mask_token_id,
                           raw=raw)

    def __call__(self, rec: RawRecord):
        try:
            return self.parse(rec)
        except DataError as e:
            if not self.skip_invalid:
                raise
            return Skipped((Skip.from_error(INVALID, e),))

    def parse(self, rec: RawRecord):
        raise NotImplementedError


class PretrainFormat(_Format):
    """`{"input_ids"}` or `{"text"}` -> `Document` (tokens + EOS)."""

    def parse(self, rec: RawRecord) -> Document:
        obj = decode_record(rec)
        raw = rec.data if isinstance(rec.data, bytes) else None
        if "input_ids" in obj:
            arr = self.ids(obj["input_ids"], "input_ids", rec.where, raw)
        elif "text" in obj:
            text = text_field(obj["text"], "text", rec.where)
            if not text:
                raise DataError(rec.where, "text", "is empty")
            helper = _require_tokenizer(self.tokenizer, '{"text"}', rec.where)
            arr = self.ids(helper.encode(text), "text", rec.where)
        else:
            raise DataError(rec.where, "input_ids", "missing (a pretraining record needs 'input_ids' or 'text')")
        n = len(arr)
        if self.eos_token_id is not None and arr[-1] != self.eos_token_id:
            arr = np.concatenate([arr, np.array([self.eos_token_id], np.int32)])
        return Document(arr, n)


class SftFormat(_Format):
    """`{"input_ids", "prompt_length"}`, ShareGPT `conversations` or OpenAI `messages` -> `Examples`.

    `expect` limits the accepted layout ("pretokenized", "sharegpt", "openai"); None accepts any.
    """

    def __init__(self, *, max_length: int | None = None, too_long: str = "error", expect: str | None = None,
                 **kwargs):
        super().__init__(**kwargs)
        if too_long not in TOO_LONG_POLICIES:
            raise ValueError(f"too_long must be one of {TOO_LONG_POLICIES}, got {too_long!r}")
        self.max_length, self.too_long, self.expect = max_length, too_long, expect

    def parse(self, rec: RawRecord) -> Examples:
        obj = decode_record(rec)
        where = rec.where
        layout = self.expect or next((name for name, key in (("pretokenized", "input_ids"),
                                                              ("pretokenized", "prompt_length"),
                                                              ("sharegpt", "conversations"),
                                                              ("openai", "messages"),
                                                              ("alpaca", "instruction")) if key in obj), None)
        if layout is None:
            raise DataError(where, "input_ids", "missing (an SFT record needs 'input_ids' and 'prompt_length', "
                                                "'conversations', 'messages' or 'instruction'/'output')")
        if layout == "pretokenized":
            pairs = [self._pretokenized(obj, where, rec.data if isinstance(rec.data, bytes) else None)]
        elif layout == "sharegpt":
            pairs = self.chat_pairs(sharegpt_messages(obj, where), where)
        elif layout == "openai":
            pairs = self.chat_pairs(openai_messages(obj, where), where)
        elif layout == "alpaca":
            pairs = self.chat_pairs(alpaca_messages(obj, where), where)
        else:
            raise ValueError(f"unknown SFT layout {layout!r}")
        return self.fit(pairs, where)

    def _pretokenized(self, obj: dict, where: str, raw):
        if "input_ids" not in obj:
            raise DataError(where, "input_ids", "missing")
        ids = self.ids(obj["input_ids"], "input_ids", where, raw)
        if "prompt_length" not in obj:
            raise DataError(where, "prompt_length", "missing")
        pl = obj["prompt_length"]
        if isinstance(pl, bool) or not isinstance(pl, (int, np.integer)):
            raise DataError(where, "prompt_length", f"expected an integer, got {json_type(pl)}")
        pl = int(pl)
        if not 0 < pl < len(ids):
            raise DataError(where, "prompt_length", f"must satisfy 0 < prompt_length < len(input_ids) = {len(ids)} "
                                                    f"(a prompt and a non-empty answer), got {pl}")
        return ids[:pl], ids[pl:], "input_ids"

    def chat_pairs(self, messages: "_Messages", where: str) -> list:
        """(prompt ids, answer ids, field) for every assistant turn of normalised `messages`."""
        helper = _require_tokenizer(self.tokenizer, "chat", where)
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise DataError(where, messages.field, "no assistant turn (nothing to train on)")
        eot = [helper.eot_id] if helper.eot_id is not None else []
        pairs = []
        for k in turns:
            msg = messages[k]
            prompt_msgs = [{"role": m["role"], "content": m["content"]} for m in messages[:k]]
            prompt = helper.apply_chat_template(prompt_msgs, add_generation_prompt=True)
            try:
                prompt = self.ids(prompt, "prompt", where)
            except DataError as e:  # name the message whose text produced the bad token
                raise DataError(where, _culprit(self, helper, messages[:k]) or e.field, e.message) from None
            answer_ids = helper.encode(msg["content"].strip()) + eot
            if not answer_ids:
                raise DataError(where, msg["field"], "empty answer")
            answer = self.ids(answer_ids, msg["field"], where)
            pairs.append((prompt, answer, msg["field"]))
        return pairs

    def fit(self, pairs: list, where: str) -> Examples:
        """Apply max_length and the too_long policy; concatenate prompt and answer."""
        ids, pls, events = [], [], []
        limit = self.max_length
        for prompt, answer, field in pairs:
            total = len(prompt) + len(answer)
            if limit is not None and total > limit:
                what = f"example of {total} tokens (prompt {len(prompt)} + answer {len(answer)}) is longer than " \
                       f"max_length {limit}"
                if self.too_long == "error":
                    raise DataError(where, field, what + "; set data.too_long to 'skip' or 'truncate_prompt'")
                if self.too_long == "skip":
                    events.append(Skip(TOO_LONG, where, field, what))
                    continue
                keep = limit - len(answer)
                keep_bos = self.bos_token_id is not None and prompt[0] == self.bos_token_id
                if keep < (2 if keep_bos else 1):
                    raise DataError(where, field, f"{what}, and the answer alone needs {len(answer)} tokens: "
                                                  "truncating the prompt cannot make it fit (the answer is never cut)")
                cut = np.concatenate([prompt[:1], prompt[len(prompt) - keep + 1:]]) if keep_bos else prompt[-keep:]
                events.append(Skip(TRUNCATED, where, field, f"prompt cut from {len(prompt)} to {keep} tokens "
                                                            f"(max_length {limit})"))
                prompt = cut
            ids.append(np.concatenate([prompt, answer]).astype(np.int32))
            pls.append(len(prompt))
        return Examples(ids, tuple(pls), tuple(events))


def _culprit(fmt: SftFormat, helper, messages) -> str | None:
    for m in messages:
        try:
            fmt.ids(helper.encode(m["content"]), m["field"], "")
        except DataError:
            return m["field"]
    return None


class _Messages(list):
    """Normalised messages ({'role', 'content', 'field'}) plus the name of the list field."""

    def __init__(self, items, field: str):
        super().__init__(items)
        self.field = field


def _message_list(obj: dict, key: str, where: str) -> list:
    value = obj[key]
    if not isinstance(value, (list, tuple)):
        raise DataError(where, key, f"expected a list of messages, got {json_type(value)}")
    if not value:
        raise DataError(where, key, "is empty (no assistant turn)")
    return value


def _turns(obj: dict, list_key: str, role_key: str, content_key: str, where: str):
    """(field, turn) for each turn object of `obj[list_key]`, checked to hold `role_key` and `content_key`."""
    if list_key not in obj:
        raise DataError(where, list_key, "missing")
    for i, turn in enumerate(_message_list(obj, list_key, where)):
        field = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(where, field, f"expected an object, got {json_type(turn)}")
        for key in (role_key, content_key):
            if key not in turn:
                raise DataError(where, f"{field}.{key}", "missing")
        yield field, turn


def sharegpt_messages(obj: dict, where: str) -> _Messages:
    """ShareGPT `conversations` ([{'from', 'value'}]) as normalised messages."""
    out = []
    for field, turn in _turns(obj, "conversations", "from", "value", where):
        out.append({"role": _role(turn["from"], f"{field}.from", where),
                    "content": text_field(turn["value"], f"{field}.value", where), "field": f"{field}.value"})
    return _Messages(out, "conversations")


def openai_messages(obj: dict, where: str) -> _Messages:
    """OpenAI `messages` ([{'role', 'content'}], content a string or a list of text parts) as normalised messages."""
    out = []
    for field, turn in _turns(obj, "messages", "role", "content", where):
        content = turn["content"]
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = []
            for j, part in enumerate(content):
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise DataError(where, f"{field}.content[{j}]", "only text parts ({'type': 'text', 'text': ...}) "
                                                                    "are supported")
                parts.append(part["text"])
            content = "".join(parts)
        out.append({"role": _role(turn["role"], f"{field}.role", where),
                    "content": text_field(content, f"{field}.content", where), "field": f"{field}.content"})
    return _Messages(out, "messages")


def alpaca_messages(obj: dict, where: str) -> _Messages:
    """Alpaca `{"instruction", "input" (optional), "output"}` as a user turn (instruction, then the input after
    a blank line when there is one) and an assistant turn."""
    for key in ("instruction", "output"):
        if key not in obj:
            raise DataError(where, key, "missing")
    instruction = text_field(obj["instruction"], "instruction", where)
    extra = text_field(obj.get("input") or "", "input", where)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return _Messages([{"role": "user", "content": prompt, "field": "instruction"},
                      {"role": "assistant", "content": text_field(obj["output"], "output", where), "field": "output"}],
                     "output")


def _role(value, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(where, field, f"expected a string, got {json_type(value)}")
    role = ROLES.get(value.strip().lower())
    if role is None:
        raise DataError(where, field, f"unknown role {value!r} (expected one of {', '.join(ROLES)})")
    return role
