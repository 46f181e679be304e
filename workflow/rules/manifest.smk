rule manifest:
    input:
        shards=every_shard(lambda rule: rule.output.shard),
        stats=every_shard(lambda rule: rule.output.stats),
        format_files=format_files,
        selection=rules.select_vocab.output.selection,
        tokenized=rules.tokenize.output.tokenized,
    output:
        manifest=f"{CACHE_DIR}/{MANIFEST_FILE}",
    log:
        "logs/{run}/manifest.log",
    localrule: True
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        **run_params(MANIFEST_SETTINGS),
        cache_semantics_version=CACHE_SEMANTICS_VERSION,
        cache_dir=subpath(output.manifest, parent=True),
        num_shards=lambda wildcards: run_num_shards(wildcards.run),
    script:
        "../scripts/write_manifest.py"
