rule plan:
    input:
        tokenized=rules.tokenize.output.tokenized,
        model=model_input,
    output:
        plan=layout.PLAN,
    log:
        "logs/{run}/plan.log",
    localrule: True
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        **run_params(layout.PLAN_SETTINGS),
        cache_dir=layout.CACHE_DIR,
    script:
        "../scripts/plan_disk.py"
