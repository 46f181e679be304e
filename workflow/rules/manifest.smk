rule manifest:
    input:
        shards=every_shard(lambda rule: rule.output.shard),
        stats=every_shard(lambda rule: rule.output.stats),
        # Only shards that passed verification are committed.
        verified=every_shard(rules.verify_shard.output.verified),
        format_files=lambda wildcards: run_format_files(wildcards.run),
        selection=rules.select_vocab.output.selection,
        tokenized=rules.tokenize.output.tokenized,
        # The cache directory itself, whose mtime changes whenever a file is added to it, removed
        # from it or renamed in it. Snakemake (dag.py, update_needrun) remakes a missing file only
        # for a job that runs anyway: it looks for missing outputs of the target jobs alone, and
        # otherwise only compares the existing inputs of a job with its outputs. A shard, the
        # embeddings or the manifest deleted under an up-to-date report would go unnoticed. With
        # this input, deleting any cache file makes this job outdated whatever the target, and
        # the jobs that remake what is missing run first. The manifest is touched after it is
        # renamed into place, so its own commit does not count as a change.
        cache_dir=layout.CACHE_DIR,
    output:
        manifest=f"{layout.CACHE_DIR}/{layout.MANIFEST_FILE}",
    log:
        "logs/{run}/manifest.log",
    localrule: True
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        **run_params(layout.MANIFEST_SETTINGS),
        **{
            layout.DATA_DIGEST: data_sha256,
            layout.MODEL_FILES_DIGEST: model_files_sha256,
            layout.WEIGHTS_DIGEST: target_weights_sha256,
        },
        cache_semantics_version=CACHE_SEMANTICS_VERSION,
        cache_dir=subpath(output.manifest, parent=True),
        num_shards=lambda wildcards: run_num_shards(wildcards.run),
    script:
        "../scripts/write_manifest.py"
