rule manifest:
    input:
        shards=every_shard(lambda rule: rule.output.shard),
        stats=every_shard(lambda rule: rule.output.stats),
        format_files=format_files,
        selection=rules.select_vocab.output.selection,
        tokenized=rules.tokenize.output.tokenized,
    output:
        manifest="results/{run}/shards/manifest.json",
    log:
        "logs/{run}/manifest.log",
    localrule: True
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        target_model=setting("target_model"),
        revision=setting("revision"),
        input_data=setting("input_data"),
        split=setting("split"),
        shuffle_seed=setting("shuffle_seed"),
        seq_length=setting("seq_length"),
        draft_vocab_size=setting("draft_vocab_size"),
        target_probs_topk=setting("target_probs_topk"),
        aux_layer_ids=setting("aux_layer_ids"),
        dtype=setting("dtype"),
        shard_size=setting("shard_size"),
        mask_reasoning_content=setting("mask_reasoning_content"),
        mask_generation_prompt=setting("mask_generation_prompt"),
        trust_remote_code=setting("trust_remote_code"),
        format=setting("format"),
        cache_semantics_version=CACHE_SEMANTICS_VERSION,
        cache_dir=subpath(output.manifest, parent=True),
        num_shards=lambda wildcards: num_shards(wildcards.run),
    script:
        "../scripts/write_manifest.py"
