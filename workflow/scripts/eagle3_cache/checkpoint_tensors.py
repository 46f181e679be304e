"""The target's input embedding table read from the one safetensors file that holds it, without building the model.

The model class still decides which checkpoint tensor that is: the model is built on the meta
device (no memory, no weights) and the checkpoint's keys go through the renaming that
transformers applies when it loads them. What this cannot read exactly as `from_pretrained`
would load it raises `NotReadableDirectly`, and the caller builds the model instead.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class NotReadableDirectly(Exception):
    """The embedding table cannot be read without building the model; the message says why."""


def checkpoint_file(model_id: str, name: str, revision: str | None) -> Path | None:
    """`name` in a local checkpoint directory, or from a hub repository through the hub cache; None if absent."""
    if Path(model_id).is_dir():
        path = Path(model_id, name)
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(model_id, name, revision=revision))
    except EntryNotFoundError:
        return None


def safetensors_weight_map(model_id: str, revision: str | None) -> dict[str, str]:
    """Each checkpoint key and the safetensors file holding it: the weight index, or the single file's keys."""
    from safetensors import safe_open

    index = checkpoint_file(model_id, INDEX_FILE, revision)
    if index is not None:
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise NotReadableDirectly(f"{index} has no weight_map")
        return weight_map
    single = checkpoint_file(model_id, SINGLE_FILE, revision)
    if single is None:
        raise NotReadableDirectly(f"{model_id} has neither {INDEX_FILE} nor {SINGLE_FILE}")
    with safe_open(single, framework="pt") as weights:
        return dict.fromkeys(weights.keys(), SINGLE_FILE)


def meta_model(model_id: str, revision: str | None, trust_remote_code: bool) -> nn.Module:
    """The target's causal-LM class built from its config on the meta device: names and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_id, revision=revision, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def embedding_parameter_names(model: nn.Module) -> tuple[str, set[str]]:
    """The input embedding weight's own name, and every name it has (a tied output layer shares it)."""
    embedding = model.get_input_embeddings()
    own = next(f"{name}.weight" for name, module in model.named_modules() if module is embedding)
    names = {name for name, weight in model.named_parameters(remove_duplicate=False) if weight is embedding.weight}
    return own, names


def loaded_names(model: nn.Module, checkpoint_keys: Iterable[str]) -> dict[str, str]:
    """Each checkpoint key and the model parameter `from_pretrained` loads it into, renamed as it renames them.

    Keys that reach a parameter only through a conversion (a fused or split tensor) map to "".
    """
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    prefix, state = model.base_model_prefix, model.state_dict()
    names = {}
    for key in checkpoint_keys:
        renamed, converter = rename_source_key(key, renamings, converters, prefix, state)
        if renamed not in state and key in state:  # the loader's own retry: the key needed no renaming
            renamed, converter = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=state)
        names[key] = "" if converter is not None else renamed
    return names


def embedding_checkpoint_key(model: nn.Module, weight_map: dict[str, str]) -> str:
    """The checkpoint key loaded into the input embedding: the one named for it, else a tied alias."""
    own, names = embedding_parameter_names(model)
    loaded = loaded_names(model, weight_map)
    for wanted in [own, *sorted(names - {own})]:
        keys = [key for key, name in loaded.items() if name == wanted]
        if len(keys) == 1:
            return keys[0]
        if len(keys) > 1:
            raise NotReadableDirectly(f"checkpoint tensors {keys} all load into {wanted}")
    converted = [key for key, name in loaded.items() if not name]
    raise NotReadableDirectly(
        f"no checkpoint tensor loads into {own} as it is stored ({len(converted)} tensors are converted on load)"
    )


def loaded_dtype(model: nn.Module) -> torch.dtype:
    """The dtype `from_pretrained(dtype="auto")` gives the embedding table: the config's `dtype`."""
    dtype = getattr(model.config, "dtype", None)
    if dtype is None:
        raise NotReadableDirectly("config.json names no dtype, so the loader would guess it from the weights")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if model._get_dtype_plan(dtype):
        raise NotReadableDirectly(f"{type(model).__name__} keeps some modules in fp32 when loaded in {dtype}")
    return dtype


def read_input_embeddings(model_id: str, *, revision: str | None, trust_remote_code: bool) -> torch.Tensor:
    """The input embedding table as `[V, H]` fp32, read from its safetensors file as the loaded model holds it."""
    from safetensors import safe_open

    model = meta_model(model_id, revision, trust_remote_code)
    text_config = model.config.get_text_config(decoder=True)
    if getattr(model.config, "quantization_config", None) or getattr(text_config, "quantization_config", None):
        raise NotReadableDirectly("the checkpoint is quantized")
    dtype = loaded_dtype(model)
    weight_map = safetensors_weight_map(model_id, revision)
    key = embedding_checkpoint_key(model, weight_map)
    path = checkpoint_file(model_id, weight_map[key], revision)
    if path is None:
        raise NotReadableDirectly(f"{weight_map[key]}, which the weight index names for {key}, is missing")
    with safe_open(path, framework="pt") as weights:
        table = weights.get_tensor(key)
    expected = tuple(model.get_input_embeddings().weight.shape)
    if tuple(table.shape) != expected:
        raise NotReadableDirectly(f"{key} in {path.name} has shape {tuple(table.shape)}, the model wants {expected}")
    log.info("read %s from %s (%s, loaded as %s)", key, path.name, table.dtype, dtype)
    return table.to(dtype).to(torch.float32).contiguous()
