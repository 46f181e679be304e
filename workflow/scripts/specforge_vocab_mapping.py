"""Rule script: SpecForge's vocab_mapping.pt ({"d2t", "t2d"}) from our vocab_selection.pt."""

from pathlib import Path

from eagle3_cache.errors import reported_errors
from eagle3_cache.logs import logged_wall_split, setup_logging
from eagle3_cache.manifest import retire_commit
from eagle3_cache.specforge_format import write_vocab_mapping
from eagle3_cache.vocab_selection import read_vocab_selection

snakemake = snakemake  # noqa: F821 (injected by Snakemake's script directive)
log = setup_logging(snakemake.log[0])

with reported_errors(), logged_wall_split(log):
    retire_commit(Path(snakemake.output.mapping).parent, "the vocabulary mapping is being written")
    selected, target_vocab_size = read_vocab_selection(snakemake.input.selection)
    write_vocab_mapping(snakemake.output.mapping, selected, target_vocab_size)
    log.info(
        "wrote %s: %d of %d ids, in ascending id order", snakemake.output.mapping, len(selected), target_vocab_size
    )
