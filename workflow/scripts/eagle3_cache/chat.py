"""Render conversations with the tokenizer's chat template and build Automodel's loss mask.

The rows match what Automodel's ChatDataset yields for EAGLE-3 (`padding="max_length"`,
`truncation=True`, `unshifted=True`): input ids truncated at the head and right padded to
`seq_length`, a loss mask over assistant tokens, and an attention mask over the content.

Every mask is built in the coordinates of the untruncated render and then cut to `seq_length`.
Automodel builds them from renders truncated at `seq_length`; because truncation keeps the head,
both give the same masks, and one untruncated render serves the full, prefix and probe renders.

Each conversation is encoded once. A prefix render (the messages before an assistant turn) is
rendered as text only and located in the full encoding by its characters, when its end meets an
added token there (`<|im_start|>`, `<|eot_id|>`): a fast tokenizer splits text at added tokens
before anything else, so the prefix alone encodes to exactly the full encoding's tokens before it.
Elsewhere the prefix is encoded on its own, as Automodel does.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import re
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from .data import Conversation
from .errors import CacheConfigError
from .token_store import TokenizedSample

log = logging.getLogger(__name__)

GENERATION_TAG = re.compile(r"\{%-?\s+generation\s+-?%\}")
SPECIAL_TOKEN_NAMES = ("bos", "eos", "pad", "unk")


def chat_templates(tokenizer: PreTrainedTokenizerBase) -> str | dict[str, str]:
    """The tokenizer's chat template, or its named templates."""
    templates = getattr(tokenizer, "chat_template", None)
    if not templates:
        raise CacheConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template; "
            "use an instruct/chat model whose tokenizer ships one, or add one to its tokenizer_config.json"
        )
    return templates


def default_chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The template whose tags decide how the mask is built (a dict's "default" entry, else its first)."""
    templates = chat_templates(tokenizer)
    if isinstance(templates, dict):
        return templates.get("default", next(iter(templates.values())))
    return templates


def all_chat_templates_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """Every chat template the tokenizer carries, as one string."""
    templates = chat_templates(tokenizer)
    return templates if isinstance(templates, str) else json.dumps(templates, sort_keys=True)


def chat_template_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of every chat template the tokenizer carries."""
    return hashlib.sha256(all_chat_templates_text(tokenizer).encode()).hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the tokenizer's vocabulary/backend definition and its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        # Runtime settings that tokenizer calls switch on and off, not part of the vocabulary.
        definition.pop("truncation", None)
        definition.pop("padding", None)
    else:
        definition = tokenizer.get_vocab()
    payload = {"definition": definition, "special_tokens": tokenizer.special_tokens_map}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int | None, ...]:
    """(bos, eos, pad, unk) ids, None where the tokenizer has none."""
    return tuple(getattr(tokenizer, f"{name}_token_id", None) for name in SPECIAL_TOKEN_NAMES)


def padding_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The tokenizer's pad id, or its eos id when it has no pad token (Automodel's fallback)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise CacheConfigError(
            f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token; set one of them"
        )
    return pad


def added_token_texts(tokenizer: PreTrainedTokenizerBase) -> dict[int, str]:
    """The added tokens' ids and texts, which a fast tokenizer splits text at first; none for a slow
    tokenizer, which gives no character offsets."""
    if not tokenizer.is_fast:
        return {}
    return {token_id: token.content for token_id, token in tokenizer.added_tokens_decoder.items()}


def content_length(input_ids: np.ndarray, pad_id: int, eos_id: int | None) -> int:
    """Positions before the trailing pad run; when pad is eos, one trailing eos is content."""
    content = np.flatnonzero(input_ids != pad_id)
    end = int(content[-1]) + 1 if content.size else 0
    return min(end + 1, len(input_ids)) if pad_id == eos_id else end


def is_render_prefix(prefix: list[int], full: list[int], trailing_id: int | None = None) -> bool:
    """Whether `prefix` starts `full`, allowing a last token `trailing_id` that the next turn replaces."""
    if len(prefix) > len(full):
        return False
    if prefix == full[: len(prefix)]:
        return True
    return (
        len(prefix) > 1
        and trailing_id is not None
        and prefix[-1] == trailing_id
        and prefix[:-1] == full[: len(prefix) - 1]
    )


def appended_prompt_length(prefix: list[int], prompt_render: list[int], turn: list[int]) -> int:
    """How many leading tokens of `turn` the generation prompt supplies (0 unless all of them)."""
    if not is_render_prefix(prefix, prompt_render):
        return 0
    block = prompt_render[len(prefix) :]
    return len(block) if block and turn[: len(block)] == block else 0


def differing_span(full: list[int], other: list[int]) -> tuple[int, int] | None:
    """[start, stop) of `full` left once the common head and tail with `other` are removed."""
    head = 0
    while head < min(len(full), len(other)) and full[head] == other[head]:
        head += 1
    tail = 0
    while tail < min(len(full), len(other)) - head and full[-1 - tail] == other[-1 - tail]:
        tail += 1
    stop = len(full) - tail
    return (head, stop) if stop > head else None


class ChatTokenizer:
    """Turns a Conversation into a TokenizedSample exactly as Automodel's EAGLE-3 ChatDataset does."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        seq_length: int,
        *,
        mask_reasoning_content: bool = False,
        mask_generation_prompt: bool = False,
    ) -> None:
        if seq_length < 2:
            raise CacheConfigError(f"seq_length must be at least 2, got {seq_length}")
        template = default_chat_template(tokenizer)
        self.tokenizer = tokenizer
        self.seq_length = seq_length
        self.mask_reasoning_content = mask_reasoning_content
        self.mask_generation_prompt = mask_generation_prompt
        self.pad_token_id = padding_token_id(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.has_generation_tags = GENERATION_TAG.search(template) is not None
        self.added_tokens = added_token_texts(tokenizer)
        self.template_mentions_reasoning = "reasoning_content" in template
        # A template that reads enable_thinking may open an assistant turn either way, so both
        # prompts are tried; others get no such keyword.
        reads_thinking_mode = "enable_thinking" in all_chat_templates_text(tokenizer)
        self.prompt_modes = [{"enable_thinking": True}, {"enable_thinking": False}] if reads_thinking_mode else [{}]
        self._warned: set[str] = set()

    def __call__(self, conversation: Conversation) -> TokenizedSample:
        renders = _Renders(
            self.tokenizer, conversation, with_assistant_mask=self.has_generation_tags, added_tokens=self.added_tokens
        )
        if renders.assistant_mask is not None:
            mask = np.asarray(renders.assistant_mask, dtype=bool)
        else:
            mask = self.prefix_assistant_mask(renders)
        if self.mask_generation_prompt:
            mask &= ~self.generation_prompt_mask(renders)
        if self.mask_reasoning_content and self.has_reasoning(conversation):
            mask &= ~self.reasoning_mask(renders)
        return self.fixed_width_sample(renders.full, mask, conversation.where)

    def fixed_width_sample(self, full: list[int], mask: np.ndarray, where: str = "") -> TokenizedSample:
        """Cut to seq_length keeping the head, right pad, and derive the attention length."""
        kept = min(len(full), self.seq_length)
        input_ids = np.full(self.seq_length, self.pad_token_id, dtype=np.int64)
        input_ids[:kept] = full[:kept]
        loss_mask = np.zeros(self.seq_length, dtype=np.uint8)
        loss_mask[:kept] = mask[:kept]
        return TokenizedSample(
            input_ids=input_ids,
            loss_mask=loss_mask,
            length=content_length(input_ids, self.pad_token_id, self.eos_token_id),
            truncated=len(full) > self.seq_length,
            where=where,
        )

    def prefix_assistant_mask(self, renders: _Renders) -> np.ndarray:
        """Assistant turns located by rendering the messages before and through each of them."""
        full = renders.full
        mask = np.zeros(len(full), dtype=bool)
        for index in renders.assistant_indices():
            if index == 0:
                raise CacheConfigError(
                    f"{renders.where}: starts with an assistant turn, and this chat template has no "
                    "{% generation %} tags, so its span is found by rendering the messages before it, of "
                    "which there are none; put a system or user message first, or drop the sample"
                )
            start, stop = (self.checked_prefix_length(renders, k) for k in (index, index + 1))
            mask[start:stop] = True
        return mask

    def checked_prefix_length(self, renders: _Renders, count: int) -> int:
        """Token count of the first `count` messages, checked to start the full render.

        Only the part kept after truncation is compared, as in Automodel: a difference beyond
        seq_length cannot move a span inside it.
        """
        prefix = renders.prefix(count)
        kept = self.seq_length
        if not is_render_prefix(prefix[:kept], renders.full[:kept], self.eos_token_id):
            raise CacheConfigError(
                f"{renders.where}: rendering its first {count} message(s) alone is not a prefix of "
                "rendering the whole conversation, so assistant spans cannot be located (the chat template "
                "rewrites earlier turns depending on later ones); use a chat template that wraps assistant "
                "turns in {% generation %}...{% endgeneration %}"
            )
        return len(prefix)

    def generation_prompt_mask(self, renders: _Renders) -> np.ndarray:
        """The tokens opening each assistant turn that the template's generation prompt emits."""
        full = renders.full
        mask = np.zeros(len(full), dtype=bool)
        for index in renders.assistant_indices():
            if index == 0:
                self.warn_once(
                    renders.where,
                    "its leading assistant turn has no prefix to render a generation "
                    "prompt after, so the turn's opening tokens stay supervised",
                )
                continue
            prefix = renders.prefix(index)
            if not is_render_prefix(prefix, full):
                self.warn_once(
                    renders.where,
                    "a conversation prefix does not render as a prefix of the whole "
                    "conversation, so that assistant turn's opening tokens stay supervised",
                )
                continue
            turn = full[len(prefix) :]
            supplied = max(
                appended_prompt_length(prefix, renders.generation_prompt(index, mode), turn)
                for mode in self.prompt_modes
            )
            mask[len(prefix) : len(prefix) + supplied] = True
        return mask

    def reasoning_mask(self, renders: _Renders) -> np.ndarray:
        """The tokens that change when each assistant turn's reasoning_content is emptied."""
        full = renders.full
        mask = np.zeros(len(full), dtype=bool)
        for index, message in enumerate(renders.messages):
            if message["role"] != "assistant" or not message.get("reasoning_content"):
                continue
            span = differing_span(full, renders.without_reasoning(index))
            if span is None:
                self.warn_once(
                    renders.where,
                    "emptying reasoning_content does not change the render, so there is nothing to mask",
                )
                continue
            mask[span[0] : span[1]] = True
        return mask

    def has_reasoning(self, conversation: Conversation) -> bool:
        present = any(m["role"] == "assistant" and m.get("reasoning_content") for m in conversation.messages)
        if present and not self.template_mentions_reasoning:
            self.warn_once(
                conversation.where,
                "it has reasoning_content, which the chat template never mentions, "
                "so the reasoning is probably not rendered",
            )
        return present

    def warn_once(self, where: str, problem: str) -> None:
        """Log the first sample with each kind of problem (`where` names it); the rest would repeat it."""
        if problem not in self._warned:
            self._warned.add(problem)
            log.warning("%s: %s (logged once, for the first such sample)", where, problem)


class _Renders:
    """Untruncated renders of one conversation: the whole of it, and prefixes rendered once each."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        conversation: Conversation,
        with_assistant_mask: bool,
        added_tokens: dict[int, str],
    ) -> None:
        self.tokenizer = tokenizer
        self.where = conversation.where
        self.messages = conversation.messages
        self.tools = conversation.tools
        self.added_tokens = added_tokens
        if with_assistant_mask or not self.added_tokens:
            encoding = self.encode(self.messages, return_assistant_tokens_mask=with_assistant_mask)
            self.text, self.starts = "", []
        else:
            self.text = self.render(self.messages)
            encoding = tokenizer(self.text, add_special_tokens=False, return_offsets_mapping=True)
            self.starts = [start for start, _ in encoding["offset_mapping"]]
        self.full: list[int] = list(encoding["input_ids"])
        # From the template's {% generation %} blocks, when asked for.
        self.assistant_mask: list[int] | None = encoding.get("assistant_masks")
        self._prefixes: dict[int, list[int]] = {}

    def assistant_indices(self) -> list[int]:
        return [i for i, message in enumerate(self.messages) if message["role"] == "assistant"]

    def prefix(self, count: int) -> list[int]:
        if count == len(self.messages):
            return self.full
        if count not in self._prefixes:
            located = self.located_prefix_length(count)
            self._prefixes[count] = self.full[:located] if located is not None else self.ids(self.messages[:count])
        return self._prefixes[count]

    def located_prefix_length(self, count: int) -> int | None:
        """The token count of the first `count` messages' render, read off the full encoding where its
        end meets an added token there (see the module docstring); None where it does not."""
        if not self.starts:
            return None
        text = self.render(self.messages[:count])
        end = len(text)
        if not self.text.startswith(text):
            return None
        index = bisect.bisect_left(self.starts, end)
        if index == len(self.full) or self.starts[index] != end:
            return None
        token = self.added_tokens.get(self.full[index])
        return index if token is not None and self.text.startswith(token, end) else None

    def generation_prompt(self, count: int, mode: dict[str, Any]) -> list[int]:
        return self.ids(self.messages[:count], add_generation_prompt=True, **mode)

    def without_reasoning(self, index: int) -> list[int]:
        emptied = {**self.messages[index], "reasoning_content": ""}
        return self.ids([*self.messages[:index], emptied, *self.messages[index + 1 :]])

    def ids(self, messages: list[dict[str, Any]], **template_kwargs: Any) -> list[int]:
        return list(self.encode(messages, **template_kwargs)["input_ids"])

    def render(self, messages: list[dict[str, Any]]) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=False)

    def encode(self, messages: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(messages, tools=self.tools, tokenize=True, return_dict=True, **kwargs)
