from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


# First, common.smk validates the config against workflow/schemas/config.schema.yaml and checks each run.
include: "workflow/rules/common.smk"
include: "workflow/rules/demo.smk"
include: "workflow/rules/tokenize.smk"
include: "workflow/rules/vocab.smk"
include: "workflow/rules/plan.smk"
include: "workflow/rules/shards.smk"
include: "workflow/rules/specforge.smk"
include: "workflow/rules/manifest.smk"
include: "workflow/rules/validate.smk"


rule all:
    default_target: True
    input:
        expand(rules.validate.output.report, run=config["runs"]),
        every_run_shard,
    localrule: True
