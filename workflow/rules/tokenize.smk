# Tokenization in parts (eagle3_cache.data_parts): the index fixes the samples and cuts them into parts,
# a job tokenizes each part, and the run's store joins them.
checkpoint index_conversations:
    input:
        data=data_input,
    output:
        index=layout.TOKENIZE_INDEX,
    log:
        "logs/{run}/index_conversations.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        **run_params(layout.DATA_SETTINGS, applied_run_settings),
        **{layout.DATA_DIGEST: data_sha256},
        tokenize_part_size=lambda wildcards: run_settings(wildcards.run)[
            "tokenize_part_size"
        ],
    script:
        "../scripts/index_conversations.py"


rule tokenize_part:
    input:
        data=data_input,
        model=model_input,
        index=layout.TOKENIZE_INDEX,
    output:
        part=layout.TOKENIZED_PART,
    log:
        "logs/{run}/tokenize_part-{part}.log",
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


rule tokenize:
    input:
        parts=every_part,
    output:
        tokenized=layout.TOKENIZED,
    log:
        "logs/{run}/tokenize.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    script:
        "../scripts/join_tokenized.py"
