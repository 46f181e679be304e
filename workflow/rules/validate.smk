rule validate:
    input:
        manifest=rules.manifest.output.manifest,
        tokenized=rules.tokenize.output.tokenized,
        selection=rules.select_vocab.output.selection,
        counts=rules.select_vocab.output.counts,
        plan=rules.plan.output.plan,
        stats=every_shard(lambda rule: rule.output.stats),
    output:
        report=report(
            "results/{run}/validation_report.html",
            category="Validation",
            subcategory="{run}",
        ),
        json="results/{run}/validation.json",
    log:
        "logs/{run}/validate.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    threads: 4
    resources:
        gpu=gpus_per_job,
    params:
        **config["validation"],
        **run_params(TARGET_SETTINGS),
        cache_dir=subpath(input.manifest, parent=True),
        # Read when present; as inputs, a missing one would force its shard to rerun.
        benchmarks=every_shard(lambda rule: rule.benchmark),
    script:
        "../scripts/validate.py"
