rule select_vocab:
    input:
        tokenized=rules.tokenize.output.tokenized,
    output:
        selection=layout.VOCAB_SELECTION,
        counts=layout.VOCAB_COUNTS,
    log:
        "logs/{run}/select_vocab.log",
    conda:
        "../../envs/eagle3-cache.yaml"
    params:
        **run_params(layout.SELECT_VOCAB_SETTINGS),
    script:
        "../scripts/select_vocab.py"
