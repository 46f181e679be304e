rule compute_shard:
    input:
        tokenized=rules.tokenize.output.tokenized,
        selection=rules.select_vocab.output.selection,
        model=model_input,
    output:
        shard="results/{run}/shards/shard-{shard}.safetensors",
        stats="results/{run}/shard_stats/shard-{shard}.json",
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
        target_model=setting("target_model"),
        revision=setting("revision"),
        trust_remote_code=setting("trust_remote_code"),
        aux_layer_ids=setting("aux_layer_ids"),
        dtype=setting("dtype"),
        target_probs_topk=setting("target_probs_topk"),
        seq_length=setting("seq_length"),
        shard_size=setting("shard_size"),
        cache_semantics_version=CACHE_SEMANTICS_VERSION,
    script:
        "../scripts/compute_shard.py"


rule target_embeddings:
    input:
        model=model_input,
    output:
        embeddings="results/{run}/shards/target_embeddings.safetensors",
    log:
        "logs/{run}/target_embeddings.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        target_model=setting("target_model"),
        revision=setting("revision"),
        trust_remote_code=setting("trust_remote_code"),
    script:
        "../scripts/target_embeddings.py"
