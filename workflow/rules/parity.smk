rule parity:
    input:
        shards=every_shard(lambda rule: rule.output.shard),
        stats=every_shard(lambda rule: rule.output.stats),
        selection=rules.select_vocab.output.selection,
        tokenized=rules.tokenize.output.tokenized,
        model=model_input,
    output:
        parity="results/{run}/parity.json",
    log:
        "logs/{run}/parity.log",
    # The one job of its kind, ready as soon as the shards are: started before the verification
    # jobs, it runs beside them instead of after them.
    priority: 1
    conda:
        "../../envs/eagle3-cache.yaml"
    threads: 4
    resources:
        gpu=parity_gpus,
    params:
        **run_params(layout.PARITY_SETTINGS),
        **{layout.WEIGHTS_DIGEST: target_weights_sha256},
        num_samples=config["validation"]["num_samples"],
        seed=config["validation"]["seed"],
        cache_dir=layout.CACHE_DIR,
    script:
        "../scripts/live_parity.py"
