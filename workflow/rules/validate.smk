rule validate:
    input:
        manifest=rules.manifest.output.manifest,
        tokenized=rules.tokenize.output.tokenized,
        selection=rules.select_vocab.output.selection,
        counts=rules.select_vocab.output.counts,
        plan=rules.plan.output.plan,
        stats=every_shard(lambda rule: rule.output.stats),
        verified=every_shard(rules.verify_shard.output.verified),
        parity=rules.parity.output.parity,
    output:
        report=report(
            f"results/{{run}}/{layout.VALIDATION_REPORT}",
            category="Validation",
            subcategory="{run}",
        ),
        json=f"results/{{run}}/{layout.VALIDATION_JSON}",
    log:
        "logs/{run}/validate.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    threads: 1
    params:
        strict=config["validation"]["strict"],
        cache_dir=subpath(input.manifest, parent=True),
        # Read when present; as inputs, a missing one would force its shard to rerun.
        benchmarks=every_shard(lambda rule: rule.benchmark),
    script:
        "../scripts/validate.py"
