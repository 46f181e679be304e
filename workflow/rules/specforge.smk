# The specforge output format: the same shard job writing one directory of per-sample files, and
# the vocabulary mapping SpecForge's `model.vocab_mapping_path` reads. A run's `format` picks these
# rules or the Automodel ones (see shard_rule in common.smk).


rule compute_specforge_shard:
    input:
        tokenized=rules.tokenize.output.tokenized,
        selection=rules.select_vocab.output.selection,
        model=model_input,
        # Waits for the disk plan, which stops a run whose cache would not fit.
        plan=rules.plan.output.plan,
    output:
        shard=directory(f"{layout.CACHE_DIR}/{layout.SHARD_DIR}"),
        stats=layout.SHARD_STATS[layout.SPECFORGE_FORMAT],
    log:
        "logs/{run}/compute_specforge_shard-{shard}.log",
    benchmark:
        "benchmarks/{run}/specforge/shard-{shard}.tsv"
    conda:
        "../../envs/eagle3-cache.yaml"
    threads: 4
    resources:
        gpu=gpus_per_job,
    params:
        **run_params(layout.SHARD_SETTINGS),
        **{layout.WEIGHTS_DIGEST: target_weights_sha256},
        cache_semantics_version=CACHE_SEMANTICS_VERSION,
    script:
        "../scripts/compute_shard.py"


rule specforge_vocab_mapping:
    input:
        selection=rules.select_vocab.output.selection,
        # Waits for the disk plan, like every job that writes into the cache directory.
        plan=rules.plan.output.plan,
    output:
        mapping=f"{layout.CACHE_DIR}/{layout.VOCAB_MAPPING_FILE}",
    log:
        "logs/{run}/specforge_vocab_mapping.log",
    localrule: True
    conda:
        "../../envs/eagle3-cache.yaml"
    script:
        "../scripts/specforge_vocab_mapping.py"
