rule convert_demo_model:
    output:
        directory(layout.DEMO_MODEL),
    log:
        "logs/convert_demo_model.log",
    localrule: True
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        package=layout.DEMO_PACKAGE,
        gguf_file=layout.DEMO_GGUF,
    script:
        "../scripts/convert_gguf.py"
