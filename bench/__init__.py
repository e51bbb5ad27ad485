"""The experiments around the method: every speed and accuracy figure of docs/results.md is made here, driven by
`python benchmark.py COMMAND` (bench/README.md lists the commands). They import the pipeline and never copy it;
nothing outside bench/ imports them.

    accuracy.py     the paper's table on the synthetic cohort: encoders x pre-training x MIL, references, 3D CNN
    config.py       its settings, and what each row depends on (its fingerprint) and costs (its FLOPs)
    report.py       finished rows kept beside the report, and the tables written from them
    ablation.py     LeCL's settings one at a time on the table's ViT row
    baseline3d.py   the end-to-end 3D network the paper argues against
    probe.py        diagnostics of an encoder: the tumour-slice probe, collapse, the twin test
    speed.py        timings and memory: the selective scan, the encoders, extraction, the MIL fit
    twin_variants.py  ad hoc encoders of the twin test (loaded with --encoder-module)
    commands.py     the commands of benchmark.py: each runs one of these and prints its table
"""
