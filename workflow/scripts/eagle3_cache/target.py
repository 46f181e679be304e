"""The target model: loading it, finding its decoder layers and aux layers, and identifying its weights."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from .checkpoint_tensors import NotReadableDirectly, read_input_embeddings
from .errors import CacheConfigError
from .hub import loading
from .input_digest import checkpoint_weight_files
from .preflight import check_device, resolved_aux_layer_ids
from .provenance import file_sha256
from .shard_format import DTYPES
from .shard_layout import stored_safetensors_header

if TYPE_CHECKING:
    from transformers import PretrainedConfig

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
# CPU flags of native bf16 / fp16 matrix multiplies. Without them torch emulates the type, and a
# bf16 forward ran 3.2x slower than fp32 (an AVX-512 CPU without AVX512-BF16 or AMX).
NATIVE_CPU_FLAGS = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16", "avx512_fp16")}
CPUINFO = Path("/proc/cpuinfo")


def resolve_device(name: str) -> torch.device:
    """`auto` means CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cuda", "cpu"):
        raise CacheConfigError(f"device must be one of auto, cuda, cpu; got {name!r}. Fix `device` in the config.")
    check_device(name, torch.cuda.device_count)
    return torch.device(name)


def compute_dtype(device: torch.device, setting: str = "auto") -> torch.dtype:
    """The run's `compute_dtype` on `device`: `auto` is bf16 on CUDA and fp32 on CPU, as NeMo Automodel computes."""
    if setting != "auto":
        return DTYPES[setting]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU's feature flags as Linux lists them; empty where they cannot be read."""
    try:
        lines = cpuinfo.read_text().splitlines()
    except OSError:
        return set()
    flags = next((line for line in lines if line.startswith("flags")), "")
    return set(flags.partition(":")[2].split())


def emulated_cpu_dtype_warning(dtype: torch.dtype, flags: set[str]) -> str | None:
    """What to tell a user computing in `dtype` on a CPU whose `flags` show no native support for it."""
    native = NATIVE_CPU_FLAGS.get(dtype)
    if native is None or not flags or flags & set(native):
        return None
    return (
        f"compute_dtype {str(dtype).removeprefix('torch.')} on a CPU without {' or '.join(native)}: torch emulates "
        "it, so the forward runs several times slower than in fp32 (set compute_dtype: auto, fp32 on the CPU)"
    )


def load_target(
    model_id: str,
    *,
    revision: str | None,
    trust_remote_code: bool,
    device: torch.device,
    dtype: str = "auto",
    num_gpus: int = 1,
) -> nn.Module:
    """Load a causal LM from a hub id or a local directory, in eval mode on `device`, to compute in `dtype`
    (a `compute_dtype` setting).

    With several GPUs the model is split across them (accelerate's `device_map="auto"`), so a
    target too big for one GPU still works.
    """
    from transformers import AutoModelForCausalLM

    computes_in = compute_dtype(device, dtype)
    if device.type == "cpu" and (warning := emulated_cpu_dtype_warning(computes_in, cpu_flags())):
        log.warning(warning)
    if device.type == "cuda":
        # Read once, as CUDA's allocator starts: forwards of varying widths then grow and shrink segments
        # instead of fragmenting fixed ones.
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if device.type != "cuda":
        device_map = None
    elif num_gpus > 1:
        device_map = "auto"
    else:
        device_map = {"": str(device)}  # straight to the GPU, never a full copy in host RAM
    with loading("target_model", model_id, revision=revision):
        model, loaded = AutoModelForCausalLM.from_pretrained(
            model_id,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=computes_in,
            device_map=device_map,
            output_loading_info=True,
        )
    check_nothing_missing(model_id, loaded["missing_keys"])
    return model.eval()


def check_nothing_missing(model_id: str, missing: Sequence[str]) -> None:
    """Refuse a target that transformers completed with freshly initialised tensors (a hub checkpoint is
    checked here, once downloaded; a local one is also checked from its files before any job)."""
    if missing:
        named = ", ".join(sorted(missing)[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CacheConfigError(
            f"target_model {model_id!r}: its checkpoint lacks {len(missing)} tensor(s) the model needs ({named}), "
            "which would be random, and so would every cached value; use a complete checkpoint (or one whose "
            "config.json ties what it does not store)"
        )


def num_hidden_layers(model: nn.Module) -> int:
    """Decoder depth; multimodal wrappers keep it on `config.text_config`."""
    text_config = getattr(model.config, "text_config", None)
    if text_config is not None and getattr(text_config, "num_hidden_layers", None) is not None:
        return int(text_config.num_hidden_layers)
    return int(model.config.num_hidden_layers)


def hidden_size(model: nn.Module) -> int:
    """Width of one decoder layer's output."""
    return config_hidden_size(model.config)


def config_hidden_size(config: PretrainedConfig) -> int:
    """Width of one decoder layer's output, from the model's config; multimodal wrappers keep it on `text_config`."""
    text_config = getattr(config, "text_config", None)
    return int((text_config or config).hidden_size)


def resolve_aux_layer_ids(model: nn.Module, aux_layer_ids: Sequence[int] | None) -> list[int]:
    """The configured ids, or the default recipe for this model's depth, validated."""
    return resolved_aux_layer_ids(aux_layer_ids, num_hidden_layers(model))


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


def model_identity(model_id: str, revision: str | None, model: nn.Module) -> dict:
    """What identifies the target's weights: the hub commit, or a local checkpoint's fingerprint."""
    config_json = json.dumps(model.config.to_dict(), sort_keys=True, default=str)
    identity = {
        "target_model": model_id,
        "revision": revision,
        "commit": getattr(model.config, "_commit_hash", None),
        "config_sha256": hashlib.sha256(config_json.encode()).hexdigest(),
    }
    if Path(model_id).is_dir():
        identity["weight_files_sha256"] = local_checkpoint_fingerprint(Path(model_id))
    return identity


def local_checkpoint_fingerprint(model_dir: Path) -> str:
    """sha256 of what describes a local checkpoint, cheap to read: not a hash of its weight values.

    It covers config.json's bytes; each weight file's name and size (`*.safetensors`, `*.bin`,
    `*.pt`, `*.gguf`, `*.index.json`); each safetensors file's JSON header (tensor names, dtypes,
    shapes, offsets) and each index file's bytes. It does not read the weight values, which the
    workflow tracks by content (`input_digest`, the `target_weights_sha256` param) before any job.
    """
    config = model_dir / "config.json"
    description = {
        "config.json": file_sha256(config) if config.is_file() else None,
        "weight_files": [weight_file_description(path) for path in checkpoint_weight_files(model_dir)],
    }
    return hashlib.sha256(json.dumps(description).encode()).hexdigest()


def weight_file_description(path: Path) -> list[str | int | None]:
    """`[name, size, sha256 of its safetensors header or index bytes]`; None for other formats' contents."""
    if path.suffix == ".safetensors":
        described = hashlib.sha256(stored_safetensors_header(path)).hexdigest()
    elif path.name.endswith(".index.json"):
        described = file_sha256(path)
    else:
        described = None
    return [path.name, path.stat().st_size, described]


def input_embeddings(model_id: str, *, revision: str | None, trust_remote_code: bool) -> torch.Tensor:
    """The target's input embedding table as `[V, H]` fp32, as the loaded model holds it.

    Read from the one safetensors file that holds it (see `checkpoint_tensors`). Where that cannot be
    done exactly, the model is built on the CPU in its checkpoint dtype (no upcast of the whole
    model), which needs about the checkpoint's size in RAM.
    """
    from transformers import AutoModelForCausalLM

    with loading("target_model", model_id, revision=revision):
        try:
            return read_input_embeddings(model_id, revision=revision, trust_remote_code=trust_remote_code)
        except NotReadableDirectly as reason:
            log.info("building %s to read its input embeddings: %s", model_id, reason)
        model = AutoModelForCausalLM.from_pretrained(
            model_id, revision=revision, trust_remote_code=trust_remote_code, dtype="auto"
        )
    return model.get_input_embeddings().weight.detach().to(torch.float32).contiguous()
