"""The target model: loading it, capturing its aux layers, and turning a token batch into cache rows.

`compute_cache_batch` is the one function that defines what a cache holds. The shard jobs
call it to build shards and the validation step calls it to re-check them against the live
target, so the two cannot drift.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import CacheConfigError
from .shard_format import DTYPES, compress_target_probs, is_topk
from .timing import NO_TIMER, PhaseTimer
from .tokenized import TokenBlock

log = logging.getLogger(__name__)

# Where decoder layers live in the causal-LM layouts we support, tried in order
# (the same search NeMo Automodel's target wrapper does).
LAYER_CONTAINERS = (
    ("model", "layers"),
    ("model", "language_model", "layers"),
    ("language_model", "layers"),
    ("layers",),
    ("transformer", "h"),
)
# Architectures whose logits are exactly `lm_head(decoder output)`: for these the output layer
# runs only on the draft-vocabulary rows, plus a full-vocabulary top-1 at supervised positions.
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe"})
TOP1_CHUNK_ROWS = 512
# What a cache row carries about the target's prediction: Automodel's draft-vocabulary distribution,
# or SpecForge's final post-norm hidden state (its trainer applies lm_head itself).
TARGET_REPRS = ("distribution", "hidden_state")


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cuda", "cpu"):
        raise CacheConfigError(f"device must be one of auto, cuda, cpu; got {name!r}. Fix `device` in the config.")
    if name == "cuda" and not torch.cuda.is_available():
        raise CacheConfigError("device is 'cuda' but no CUDA device is visible. Use `device: auto` or `cpu`.")
    return torch.device(name)


def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA and fp32 on CPU, as NeMo Automodel computes."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_target(
    model_id: str,
    *,
    revision: str | None,
    trust_remote_code: bool,
    device: torch.device,
    num_gpus: int = 1,
) -> nn.Module:
    """Load a causal LM from a hub id or a local directory, in eval mode on `device`.

    With several GPUs the model is split across them (accelerate's `device_map="auto"`), so a
    target too big for one GPU still works.
    """
    from transformers import AutoModelForCausalLM

    if device.type != "cuda":
        device_map = None
    elif num_gpus > 1:
        device_map = "auto"
    else:
        device_map = {"": str(device)}  # straight to the GPU, never a full copy in host RAM
    model = AutoModelForCausalLM.from_pretrained(
        model_id,
        revision=revision,
        trust_remote_code=trust_remote_code,
        dtype=compute_dtype(device),
        device_map=device_map,
    )
    return model.eval()


def num_hidden_layers(model: nn.Module) -> int:
    """Decoder depth; multimodal wrappers keep it on `config.text_config`."""
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None and getattr(text_config, "num_hidden_layers", None) is not None:
        return int(text_config.num_hidden_layers)
    return int(model.config.num_hidden_layers)


def hidden_size(model: nn.Module) -> int:
    """Width of one decoder layer's output."""
    text_config = getattr(model.config, "text_config", None)
    return int(getattr(text_config or model.config, "hidden_size"))


def default_aux_layer_ids(num_layers: int) -> list[int]:
    """EAGLE-3's low / middle / high layer recipe."""
    return [1, num_layers // 2 - 1, num_layers - 4]


def validate_aux_layer_ids(aux_layer_ids: Sequence[int], num_layers: int) -> list[int]:
    """Exactly three distinct in-range layer ids, or an error that says what to set."""
    ids = list(aux_layer_ids)
    in_range = all(0 <= i < num_layers for i in ids)
    if len(ids) != 3 or len(set(ids)) != 3 or not in_range:
        raise CacheConfigError(
            f"aux_layer_ids must be 3 distinct layer ids in [0, {num_layers - 1}] for this "
            f"{num_layers}-layer target; got {ids}. Set `aux_layer_ids` in the run's config "
            "(it must match the draft's num_aux_hidden_states)."
        )
    return ids


def resolve_aux_layer_ids(model: nn.Module, aux_layer_ids: Sequence[int] | None) -> list[int]:
    """The configured ids, or the default recipe for this model's depth, validated."""
    num_layers = num_hidden_layers(model)
    return validate_aux_layer_ids(
        default_aux_layer_ids(num_layers) if aux_layer_ids is None else aux_layer_ids, num_layers
    )


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's decoder layers in order, from the first known container layout it has."""
    for path in LAYER_CONTAINERS:
        container = model
        for attr in path:
            container = getattr(container, attr, None)
            if container is None:
                break
        if container is not None:
            if isinstance(container, nn.ModuleDict):
                return [container[str(i)] for i in range(len(container))]
            return list(container)
    searched = ", ".join(".".join(p) for p in LAYER_CONTAINERS)
    raise CacheConfigError(
        f"Cannot find the decoder layers of {type(model).__name__} (searched {searched}). "
        "Use a Hugging Face causal LM with one of these layouts."
    )


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
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "loss_mask": self.loss_mask}

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


def shifted_left(tensor: torch.Tensor) -> torch.Tensor:
    """Shift a `[n, S]` tensor left by one along the sequence, with 0 in the last slot."""
    shifted = torch.zeros_like(tensor)
    shifted[:, :-1] = tensor[:, 1:]
    return shifted


def forward_width(lengths: torch.Tensor, seq_length: int, spec: CacheSpec) -> int:
    """How many leading positions the target must see for this batch.

    For a distribution, one position past the longest row: the stored distribution at a row's last
    content position comes from the target's logits at the next position, as in the straightforward
    computation. A hidden state is stored at each content position itself.
    """
    past_content = 1 if spec.target_repr == "distribution" else 0
    return min(seq_length, max(1, int(lengths.max()) + past_content))


def selected_token_mask(selected: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A `[vocab_size]` bool mask, True at the draft vocabulary's ids (on `selected`'s device)."""
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=selected.device)
    mask[selected] = True
    return mask


def draft_distribution(
    logits: torch.Tensor, shifted_loss_mask: torch.Tensor, spec: CacheSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(target_probs, position_mask)` from next-token logits `[n, W, V]`, never a full-vocab fp32 copy.

    The argmax runs over the full vocabulary in the compute dtype; only the draft-vocab columns are
    upcast for the softmax.
    """
    selected = spec.selected_token_ids.to(logits.device)
    selected_mask = selected_token_mask(selected, logits.shape[-1])
    position_mask = (selected_mask[logits.argmax(dim=-1)] & shifted_loss_mask.bool()).unsqueeze(-1)
    probs = torch.softmax(logits.index_select(-1, selected).float(), dim=-1)
    return probs, position_mask


def plain_output_head(model: nn.Module) -> nn.Linear | None:
    """The output layer when the logits are exactly `lm_head(decoder output)`, else None.

    Only for architectures known to apply nothing after the head (no softcapping or scaling);
    other models take the full-logits path.
    """
    head = model.get_output_embeddings()
    known = getattr(model.config, "model_type", None) in PLAIN_HEAD_MODEL_TYPES
    return head if known and isinstance(head, nn.Linear) and head.bias is None else None


def draft_distribution_from_hidden(
    hidden: torch.Tensor, head: nn.Linear, shifted_loss_mask: torch.Tensor, spec: CacheSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """`draft_distribution(head(hidden))`, computing only the logits it needs.

    The draft-vocab logits come from the head's selected rows; the full-vocabulary top-1 is
    needed only at supervised positions, a bounded number of rows at a time.
    """
    weight = head.weight
    hidden = hidden.to(weight.device)
    selected = spec.selected_token_ids.to(weight.device)
    probs = torch.softmax(F.linear(hidden, weight[selected]).float(), dim=-1)
    supervised = shifted_loss_mask.to(weight.device).bool()
    selected_mask = selected_token_mask(selected, weight.shape[0])
    top1 = [F.linear(rows, weight).argmax(dim=-1) for rows in hidden[supervised].split(TOP1_CHUNK_ROWS)]
    position_mask = torch.zeros_like(supervised)
    if top1:
        position_mask[supervised] = selected_mask[torch.cat(top1)]
    return probs, position_mask.unsqueeze(-1)


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
    model: nn.Module, spec: CacheSpec, tokens: TokenBlock, timer: PhaseTimer = NO_TIMER
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
    width = forward_width(lengths, seq_length, spec)
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
                probs, position_mask = draft_distribution(next_token, loss_mask, spec)
            else:
                probs, position_mask = draft_distribution_from_hidden(next_token, head, loss_mask, spec)
            computed.update(with_last_slot({"position_mask": position_mask, **stored_distribution(probs, spec)}, spec))
    return CacheBatch(
        input_ids=shifted_left(tokens.input_ids),
        attention_mask=tokens.attention_mask.clone(),
        loss_mask=shifted_loss_mask,
        computed={name: values.to(device) for name, values in computed.items()},
        lengths=lengths,
    )


def with_last_slot(fields: dict[str, torch.Tensor], spec: CacheSpec) -> dict[str, torch.Tensor]:
    """Append position W - 1, which has no next-token logits.

    In a full-length row it is the last slot, where the straightforward computation shifts in zero
    logits: no supervision and a uniform distribution. In a shorter batch it lies past every row's
    content and is never stored.
    """
    n = fields["position_mask"].shape[0]
    device = fields["position_mask"].device
    tail = {"position_mask": torch.zeros((n, 1, 1), dtype=torch.bool, device=device)}
    tail.update({name: values.expand(n, 1, -1) for name, values in last_slot_distribution(spec, device).items()})
    return {name: torch.cat([values, tail[name]], dim=1) for name, values in fields.items()}


def model_identity(model_id: str, revision: str | None, model: nn.Module) -> dict:
    """What identifies the target's weights: the hub commit, or a hash of a local checkpoint's files."""
    config_json = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    identity = {
        "target_model": model_id,
        "revision": revision,
        "commit": getattr(model.config, "_commit_hash", None),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
    }
    if Path(model_id).is_dir():
        identity["weight_files_sha256"] = local_weight_files_hash(Path(model_id))
    return identity


def local_weight_files_hash(model_dir: Path) -> str:
    """A cheap fingerprint of a local checkpoint: the names and sizes of its weight files."""
    listing = sorted(
        (p.name, p.stat().st_size)
        for p in model_dir.iterdir()
        if p.suffix in (".safetensors", ".bin", ".pt", ".gguf") or p.name.endswith(".index.json")
    )
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def input_embeddings(model_id: str, *, revision: str | None, trust_remote_code: bool) -> torch.Tensor:
    """The target's input embedding table as `[V, H]` fp32.

    The model is loaded on the CPU in its checkpoint dtype (no upcast of the whole model), so this
    needs about the checkpoint's size in RAM.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_id, revision=revision, trust_remote_code=trust_remote_code, dtype="auto"
    )
    return model.get_input_embeddings().weight.detach().to(torch.float32).contiguous()
