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
include: "workflow/rules/verify.smk"
include: "workflow/rules/manifest.smk"
include: "workflow/rules/parity.smk"
include: "workflow/rules/validate.smk"


# A damaged product set aside as the workflow was read (common.smk) is rebuilt alone: this run's
# default target.
if REBUILD_FIRST:

    rule all:
        default_target: True
        input:
            REBUILD_FIRST,
        localrule: True

else:

    rule all:
        default_target: True
        # Every file of every cache, not only the report: Snakemake remakes a missing file only for a
        # job that needs it.
        input:
            expand(rules.validate.output.report, run=config["runs"]),
            expand(rules.parity.output.parity, run=config["runs"]),
            expand(rules.manifest.output.manifest, run=config["runs"]),
            every_run_format_files,
            every_run_shard(lambda rule: rule.output.shard),
            every_run_shard(rules.verify_shard.output.verified),
        localrule: True
