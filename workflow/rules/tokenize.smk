checkpoint tokenize:
    input:
        data=data_input,
        model=model_input,
    output:
        tokenized="results/{run}/tokenized.h5",
    log:
        "logs/{run}/tokenize.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    threads: 4
    params:
        target_model=setting("target_model"),
        revision=setting("revision"),
        trust_remote_code=setting("trust_remote_code"),
        input_data=setting("input_data"),
        split=setting("split"),
        shuffle_seed=setting("shuffle_seed"),
        seq_length=setting("seq_length"),
        mask_reasoning_content=setting("mask_reasoning_content"),
        mask_generation_prompt=setting("mask_generation_prompt"),
    script:
        "../scripts/tokenize_conversations.py"
