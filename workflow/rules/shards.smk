rule compute_shard:
    input:
        tokenized=rules.tokenize.output.tokenized,
        selection=rules.select_vocab.output.selection,
        model=model_input,
        # Waits for the disk plan, which stops a run whose cache would not fit.
        plan=rules.plan.output.plan,
    output:
        shard=f"{layout.CACHE_DIR}/{layout.SHARD_FILE}",
        stats=layout.SHARD_STATS[layout.AUTOMODEL_FORMAT],
    log:
        "logs/{run}/compute_shard-{shard}.log",
    benchmark:
        "benchmarks/{run}/shard-{shard}.tsv"
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


rule target_embeddings:
    input:
        model=model_input,
        # Waits for the disk plan, like every job that writes into the cache directory. A plain input (an
        # ancient() one leaves a run after a new plan with the plan alone): the plan changes only with
        # settings that rerun every shard anyway.
        plan=rules.plan.output.plan,
    output:
        embeddings=f"{layout.CACHE_DIR}/{layout.EMBEDDINGS_FILE}",
    log:
        "logs/{run}/target_embeddings.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        **run_params(layout.TARGET_SETTINGS),
        **{layout.WEIGHTS_DIGEST: target_weights_sha256},
    script:
        "../scripts/target_embeddings.py"
