rule convert_demo_model:
    output:
        directory(DEMO_MODEL),
    log:
        "logs/convert_demo_model.log",
    localrule: True
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        package=DEMO_PACKAGE,
        gguf_file=DEMO_GGUF,
    script:
        "../scripts/convert_gguf.py"
