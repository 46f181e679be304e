checkpoint tokenize:
    input:
        data=data_input,
        model=model_input,
    output:
        tokenized=layout.TOKENIZED,
    log:
        "logs/{run}/tokenize.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        **run_params(layout.TOKENIZE_SETTINGS, applied_run_settings),
        **{
            layout.DATA_DIGEST: data_sha256,
            layout.MODEL_FILES_DIGEST: model_files_sha256,
        },
    script:
        "../scripts/tokenize_conversations.py"
