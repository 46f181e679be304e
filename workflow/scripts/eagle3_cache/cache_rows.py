"""Cache rows: running the target on a token batch and turning its outputs into what a shard stores.

`compute_cache_batch` is the one function that defines what a cache holds. The shard jobs
call it to build shards and the validation step calls it to re-check them against the live
target, so the two cannot drift.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .array_ops import shifted_left
from .shard_format import DTYPES, compress_target_probs
from .shard_layout import TOKEN_FIELDS, is_topk
from .target import decoder_layers
from .timing import NO_TIMER, NullTimer, PhaseTimer
from .token_store import TokenBlock

# Architectures whose logits are exactly `lm_head(decoder output)`: for these the output layer
# runs only on the draft-vocabulary rows, plus a full-vocabulary top-1 at supervised positions.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"})
TOP1_CHUNK_ROWS = 512
# What a cache row carries about the target's prediction: Automodel's draft-vocabulary distribution,
# or SpecForge's final post-norm hidden state (its trainer applies lm_head itself).
TARGET_REPRS = ("distribution", "hidden_state")
# The fp32 softmax temporaries of one forward's distribution step, at most.
DISTRIBUTION_BLOCK_BYTES = 256 << 20


@contextlib.contextmanager
def captured_layer_outputs(model: nn.Module, layer_ids: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Capture each listed decoder layer's output (= HF `hidden_states[i + 1]`) during a forward."""
    captured: dict[int, torch.Tensor] = {}
    layers = decoder_layers(model)

    def hook_for(layer_id: int):
        def hook(_module, _inputs, output):
            captured[layer_id] = output[0] if isinstance(output, tuple) else output

        return hook

    handles = [layers[i].register_forward_hook(hook_for(i)) for i in layer_ids]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class CacheSpec:
    """Everything besides the tokens that decides a cache row's content."""

    aux_layer_ids: list[int]
    selected_token_ids: torch.Tensor
    target_vocab_size: int
    dtype: str
    target_probs_topk: int
    target_repr: str = "distribution"

    def __post_init__(self) -> None:
        if self.target_repr not in TARGET_REPRS:
            raise ValueError(f"target_repr must be one of {TARGET_REPRS}, got {self.target_repr!r}")

    @property
    def cache_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def draft_vocab_size(self) -> int:
        return int(self.selected_token_ids.numel())

    @property
    def stores_topk(self) -> bool:
        return is_topk(self.target_probs_topk, self.draft_vocab_size)


@dataclass
class CacheBatch:
    """Cache rows for a batch of samples.

    `input_ids`, `attention_mask`, `loss_mask` are full `[n, S]` rows as stored. The computed
    fields in `computed` are `[n, W, ...]` with W <= S the width the target ran on; only the first
    `lengths[i]` positions of row i carry meaning (the rest of a stored row is zeros).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    computed: dict[str, torch.Tensor]
    lengths: torch.Tensor

    @property
    def full_width_fields(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, name) for name in TOKEN_FIELDS}

    def cpu(self) -> CacheBatch:
        """The same rows with every tensor on the CPU."""
        return CacheBatch(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            loss_mask=self.loss_mask,
            computed={name: values.cpu() for name, values in self.computed.items()},
            lengths=self.lengths,
        )

    def padded(self) -> dict[str, torch.Tensor]:
        """Every field as a full `[n, S, ...]` tensor, exactly as a shard stores it."""
        seq_length = self.input_ids.shape[1]
        fields = dict(self.full_width_fields)
        for name, values in self.computed.items():
            full = values.new_zeros((values.shape[0], seq_length, *values.shape[2:]))
            for row, length in enumerate(self.lengths.tolist()):
                full[row, :length] = values[row, :length]
            fields[name] = full
        return fields


def forward_width(lengths: torch.Tensor, seq_length: int, target_repr: str) -> int:
    """How many leading positions the target must see for this batch.

    For a distribution, one position past the longest row: the stored distribution at a row's last
    content position comes from the target's logits at the next position, as in the straightforward
    computation. A hidden state is stored at each content position itself.
    """
    past_content = 1 if target_repr == "distribution" else 0
    return min(seq_length, max(1, int(lengths.max()) + past_content))


def selected_token_mask(selected: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A `[vocab_size]` bool mask, True at the draft vocabulary's ids (on `selected`'s device)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=selected.device)
    mask[selected] = True
    return mask


def draft_logits(
    logits: torch.Tensor, shifted_loss_mask: torch.Tensor, spec: CacheSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(draft-vocab logits, position_mask)` from next-token logits `[n, W, V]`, in the compute dtype.

    The argmax runs over the full vocabulary; only the draft-vocab columns are kept, for the softmax
    (`stored_distribution_fields`).
    """
    selected = spec.selected_token_ids.to(logits.device)
    selected_mask = selected_token_mask(selected, logits.shape[-1])
    position_mask = (selected_mask[logits.argmax(dim=-1)] & shifted_loss_mask.bool()).unsqueeze(-1)
    return logits.index_select(-1, selected), position_mask


def plain_output_head(model: nn.Module) -> nn.Linear | None:
    """The output layer when the logits are exactly `lm_head(decoder output)`, else None.

    Only for architectures known to apply nothing after the head (no softcapping or scaling);
    other models take the full-logits path.
    """
    head = model.get_output_embeddings()
    known = getattr(model.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
    return head if known and isinstance(head, nn.Linear) and head.bias is None else None


def draft_logits_from_hidden(
    hidden: torch.Tensor, head: nn.Linear, shifted_loss_mask: torch.Tensor, spec: CacheSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """`draft_logits(head(hidden))`, computing only the logits it needs.

    The draft-vocab logits come from the head's selected rows; the full-vocabulary top-1 is
    needed only at supervised positions, a bounded number of rows at a time.
    """
    weight = head.weight
    hidden = hidden.to(weight.device)
    selected = spec.selected_token_ids.to(weight.device)
    logits = F.linear(hidden, weight[selected])
    supervised = shifted_loss_mask.to(weight.device).bool()
    selected_mask = selected_token_mask(selected, weight.shape[0])
    top1 = [F.linear(rows, weight).argmax(dim=-1) for rows in hidden[supervised].split(TOP1_CHUNK_ROWS)]
    position_mask = torch.zeros_like(supervised)
    if top1:
        position_mask[supervised] = selected_mask[torch.cat(top1)]
    return logits, position_mask.unsqueeze(-1)


def stored_distribution_fields(
    logits: torch.Tensor, position_mask: torch.Tensor, spec: CacheSpec
) -> dict[str, torch.Tensor]:
    """The distribution fields of a forward of width W from its draft-vocab next-token logits and position
    mask (`[n, W - 1, ...]`): each position's softmax in fp32, stored as the cache stores it, then position
    W - 1, which has no next-token logits. In a full-length row it is the last slot, where the
    straightforward computation shifts in zero logits: no supervision and a uniform distribution. In a
    shorter batch it lies past every row's content and is never stored.

    The softmax runs on a bounded block of positions at a time, written into the stored fields, so the fp32
    temporaries never exceed DISTRIBUTION_BLOCK_BYTES whatever the forward's size: at 65,536 positions and
    a 32,000-id draft vocabulary, a softmax of the whole forward would hold 17 GB of them.
    """
    n, positions, vocab = logits.shape
    tail = last_slot_distribution(spec, logits.device)
    fields = {
        name: torch.empty((n, positions + 1, values.shape[-1]), dtype=values.dtype, device=logits.device)
        for name, values in tail.items()
    }
    rows, columns = distribution_block(n, positions, vocab)
    for row in range(0, n, rows):
        for column in range(0, positions, columns):
            block = (slice(row, row + rows), slice(column, column + columns))
            probs = torch.softmax(logits[block].float(), dim=-1)
            for name, values in stored_distribution(probs, spec).items():
                fields[name][block] = values
    for name, values in tail.items():
        fields[name][:, positions:] = values
    fields["position_mask"] = torch.cat([position_mask, position_mask.new_zeros((n, 1, 1))], dim=1)
    return fields


def distribution_block(rows: int, positions: int, vocab: int) -> tuple[int, int]:
    """(rows, positions) of the softmax's blocks: whole rows while they fit DISTRIBUTION_BLOCK_BYTES of fp32,
    else part of one row."""
    fitting = max(1, DISTRIBUTION_BLOCK_BYTES // (4 * vocab))
    if fitting < positions:
        return 1, fitting
    return max(1, fitting // max(1, positions)), positions


def stored_distribution(probs: torch.Tensor, spec: CacheSpec) -> dict[str, torch.Tensor]:
    """fp32 draft-vocab probabilities as the cache stores them: in full or as top-k."""
    if spec.stores_topk:
        values, indices = compress_target_probs(probs, spec.target_probs_topk)
        return {"target_probs_values": values.to(spec.cache_dtype), "target_probs_indices": indices}
    return {"target_probs": probs.to(spec.cache_dtype)}


def last_slot_distribution(spec: CacheSpec, device: torch.device) -> dict[str, torch.Tensor]:
    """What the last slot of a full-length row stores: the softmax of the zero logits shifted in."""
    uniform = torch.softmax(torch.zeros(1, 1, spec.draft_vocab_size, device=device), dim=-1)
    return stored_distribution(uniform, spec)


@torch.no_grad()
def compute_cache_batch(
    model: nn.Module, spec: CacheSpec, tokens: TokenBlock, timer: PhaseTimer | NullTimer = NO_TIMER
) -> CacheBatch:
    """Run the target on one batch and return its cache rows (the shared cache computation).

    The target runs only on the leading positions the batch needs (see `forward_width`); rows are
    right padded, so trimming changes no content position. The computed fields stay on the target's
    (first) device; `CacheBatch.cpu()` brings them over. With `spec.target_repr == "hidden_state"`
    the computed fields are `aux_hidden_states` and `final_hidden_state` (the decoder's output after
    its final norm, what lm_head multiplies), and no distribution is computed.
    """
    seq_length = tokens.input_ids.shape[1]
    lengths = tokens.attention_mask.sum(dim=1)
    width = forward_width(lengths, seq_length, spec.target_repr)
    device = model.get_input_embeddings().weight.device
    input_ids = tokens.input_ids[:, :width].to(device)
    attention_mask = tokens.attention_mask[:, :width].to(device)
    shifted_loss_mask = shifted_left(tokens.loss_mask)

    head = plain_output_head(model)
    full_logits = head is None and spec.target_repr == "distribution"
    with timer.phase("forward"), captured_layer_outputs(model, spec.aux_layer_ids) as captured:
        if full_logits:
            outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        else:
            decoder = model.get_decoder()
            outputs = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    with timer.phase("distribution"):
        # A target split over several GPUs leaves layer outputs and logits on different devices.
        aux_hidden_states = torch.cat([captured[i].to(outputs.device) for i in spec.aux_layer_ids], dim=-1)
        computed = {"aux_hidden_states": aux_hidden_states.to(spec.cache_dtype)}
        if spec.target_repr == "hidden_state":
            computed["final_hidden_state"] = outputs.to(spec.cache_dtype)
        else:
            # Position p is supervised by the output at p + 1; those exist for p < width - 1.
            next_token = outputs[:, 1:width]
            loss_mask = shifted_loss_mask[:, : width - 1].to(outputs.device)
            if head is None:
                logits, position_mask = draft_logits(next_token, loss_mask, spec)
            else:
                logits, position_mask = draft_logits_from_hidden(next_token, head, loss_mask, spec)
            computed.update(stored_distribution_fields(logits, position_mask, spec))
    return CacheBatch(
        input_ids=shifted_left(tokens.input_ids),
        attention_mask=tokens.attention_mask.clone(),
        loss_mask=shifted_loss_mask,
        computed={name: values.to(device) for name, values in computed.items()},
        lengths=lengths,
    )
