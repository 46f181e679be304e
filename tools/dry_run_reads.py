"""How many bytes a dry run reads with an 8B-sized local checkpoint: hashed once, then only stat()ed.

Builds a Llama-3.1-8B-shaped checkpoint (bf16, 4 safetensors files and their index; the tensors' bytes
are holes, so it takes no disk) with the tokenizer and chat template of `--tokenizer`, a workdir running
the workflow on it, and runs `snakemake --dry-run` there `--runs` times, each in a fresh process, printing
the bytes that process read (/proc/self/io `rchar`) and its wall time. The first run hashes the weights
(results/.input_sha256.json); the next ones read only the files' headers and the store.

    python -m tools.dry_run_reads --tokenizer resources/models/SmolLM2-135M-Instruct --workdir /tmp/dry
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "workflow", "profiles", "envs")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN, VOCAB = 4096, 32, 32, 8, 14336, 128256
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": FFN,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": KV_HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 131072,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
FILES = 4
RUN = "llama8b"
# Prints the bytes this process read when it ends, whatever snakemake's exit status.
MEASURED_SNAKEMAKE = """
import atexit, sys
def report():
    rchar = next(int(line.split()[1]) for line in open("/proc/self/io") if line.startswith("rchar"))
    sys.stderr.write(f"RCHAR {rchar}\\n")
atexit.register(report)
sys.argv = ["snakemake", *sys.argv[1:]]
from snakemake.cli import main
main()
"""


def llama_8b_tensors() -> dict[str, list[int]]:
    """Every tensor of Llama-3.1-8B, by name, with its shape."""
    head_dim = HIDDEN // HEADS
    tensors = {
        "model.embed_tokens.weight": [VOCAB, HIDDEN],
        "model.norm.weight": [HIDDEN],
        "lm_head.weight": [VOCAB, HIDDEN],
    }
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        tensors |= {
            f"{prefix}.self_attn.q_proj.weight": [HIDDEN, HIDDEN],
            f"{prefix}.self_attn.k_proj.weight": [KV_HEADS * head_dim, HIDDEN],
            f"{prefix}.self_attn.v_proj.weight": [KV_HEADS * head_dim, HIDDEN],
            f"{prefix}.self_attn.o_proj.weight": [HIDDEN, HIDDEN],
            f"{prefix}.mlp.gate_proj.weight": [FFN, HIDDEN],
            f"{prefix}.mlp.up_proj.weight": [FFN, HIDDEN],
            f"{prefix}.mlp.down_proj.weight": [HIDDEN, FFN],
            f"{prefix}.input_layernorm.weight": [HIDDEN],
            f"{prefix}.post_attention_layernorm.weight": [HIDDEN],
        }
    return tensors


def write_sparse_safetensors(path: Path, tensors: dict[str, list[int]]) -> int:
    """A bf16 safetensors file whose data section is a hole as long as its header says; its size."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        handle.truncate(8 + len(encoded) + offset)
    return 8 + len(encoded) + offset


def sparse_checkpoint(model: Path, tokenizer: Path) -> int:
    """The 8B-shaped checkpoint in `model`; its weight bytes."""
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(CONFIG))
    for name in TOKENIZER_FILES:
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, model / name)
    names = list(llama_8b_tensors().items())
    per_file = -(-len(names) // FILES)
    weight_map, total = {}, 0
    for index in range(FILES):
        file = f"model-{index + 1:05d}-of-{FILES:05d}.safetensors"
        chunk = dict(names[index * per_file : (index + 1) * per_file])
        total += write_sparse_safetensors(model / file, chunk)
        weight_map |= dict.fromkeys(chunk, file)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return total


def workdir_for(workdir: Path, model: Path, conversations: list[dict] | None = None, **settings: object) -> None:
    """A copy of the workflow running `model` on `conversations` (one short exchange by default), with the
    run's other `settings`."""
    workdir.mkdir(parents=True)
    for name in WORKFLOW_FILES:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(source, workdir / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(source, workdir / name)
    (workdir / "config").mkdir()
    run = {"target_model": str(model), "input_data": "data/conversations.jsonl", **settings}
    (workdir / "config" / "config.yaml").write_text(json.dumps({"runs": {RUN: run}}))
    (workdir / "data").mkdir()
    chats = conversations or [
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}]}
    ]
    (workdir / "data" / "conversations.jsonl").write_text("".join(json.dumps(chat) + "\n" for chat in chats))


def measured_dry_run(workdir: Path) -> tuple[int, float]:
    """Bytes read and seconds taken by one `snakemake --dry-run` in `workdir`."""
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-c", MEASURED_SNAKEMAKE, "--dry-run", "--cores", "1"],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"the dry run failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    rchar = next(int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("RCHAR "))
    return rchar, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a model folder with a tokenizer and template")
    parser.add_argument("--workdir", type=Path, required=True, help="an empty or missing folder to build in")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    weight_bytes = sparse_checkpoint(args.workdir / "llama-8b", args.tokenizer.resolve())
    workdir_for(args.workdir / "work", (args.workdir / "llama-8b").resolve())
    print(f"checkpoint: {weight_bytes / 1e9:.2f} GB of weights in {FILES} files (holes: no disk used)")
    for run in range(1, args.runs + 1):
        rchar, seconds = measured_dry_run(args.workdir / "work")
        print(f"dry run {run}: read {rchar / 1e6:,.1f} MB in {seconds:.1f} s")


if __name__ == "__main__":
    main()
