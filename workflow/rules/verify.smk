rule verify_shard:
    input:
        shard=this_shard(lambda rule: rule.output.shard),
        stats=this_shard(lambda rule: rule.output.stats),
        selection=rules.select_vocab.output.selection,
        tokenized=rules.tokenize.output.tokenized,
    output:
        verified=layout.VERIFIED,
    log:
        "logs/{run}/verify_shard-{shard}.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    # CPU only: one thread per job, so that --cores N (or the CPU partition) verifies N shards at once.
    threads: 1
    params:
        **run_params(layout.VERIFY_SETTINGS),
    script:
        "../scripts/verify_shard.py"
