"""What each of LeCL's settings does: the table's cnn row with one setting changed. `python benchmark.py ablate`.

LeCL differs from MoCo v3 in a few settings: the lesion fraction, the lesion weight, the crop size and the
temperature. This runs the table's cnn row (the same cohort, slices, MIL fits, folds and seeds:
accuracy.run_encoder) once per variant below, each changing LeCL's settings (PretrainConfig: lecl.py's loss

    ℓ_i = -[ l_{i,p(i)} - log( Σ_j exp(l_ij) + Σ_{j ∈ lesion, j ≠ p(i)} exp(w · l_ij) ) ],   l_ij = q_i · k_j / τ

and views.py's crops), at the table's budget: 600 steps, about 30 min a variant on 2 CPU cores. (At a quarter
of it, 150 steps, LeCL's row is at chance, lung disease 0.535 [0.476, 0.596]: an ablation of a method that has
not learnt yet says nothing.) The cnn row because it is the family whose LeCL row learns most in the table: a
variant can only show a loss or a gain where there is a signal. The table's settings are τ = 0.2 (MoCo v3's ViT
recipe) and w = 1 (the official code's --sample-weight); the official code's τ is 1 (KatherLab/CLEAR,
main_moco.py's --moco-t), and its forward's own w is 10, whose lesion terms exp(w cos / τ) = exp(50 cos)
outweigh everything else in the denominator for an encoder whose embeddings are alike.
Rows are kept in `out`/rows/ as bench/accuracy.py keeps its own, so a killed run continues; the variants that
change nothing (lecl, moco, random, supervised) are the table's own rows, reused where the table has run. The
report is `out`/ablation.md and .json.
"""
import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from bench import accuracy, config, report
from checkpoint import plain
from files import atomic_path

VARIANTS = (  # (key, what changes, method, PretrainConfig changes as config.changed takes them)
    ("lecl", "nothing: LeCL at the table's settings (τ 0.2, w 1, lesion fraction 0.5, crop-min 0.08)", "lecl", ()),
    ("moco", "MoCo v3: no lesion crops, w 0 (lesion slices still half the batch)", "moco", ()),
    ("random", "no pre-training: random init (the floor)", "random", ()),
    ("supervised", "supervised on the corpus's mask labels per slice (the ceiling)", "supervised", ()),
    ("w0", "lesion weight w 0: lesion crops, no hard-negative term", "lecl", (("lesion_weight", 0.0),)),
    ("jitter", "MoCo v3's intensity jitter, with chance 0.8 (ColorJitter's part of its views: level ± 0.1 window "
     "widths, contrast ± 40 %)", "lecl", (("views.jitter", 0.8),)),
    ("tau1", "temperature τ 1.0 (with w 1: the official code's defaults)", "lecl", (("temperature", 1.0),)),
    ("w10", "lesion weight w 10 (the official code's forward's default: exp(50 cos) per lesion key)", "lecl",
     (("lesion_weight", 10.0),)),
    ("fcohort", "lesion fraction as in the cohort (13 % of its slices), no over-sampling", "lecl",
     (("lesion_fraction", None),)),
    ("crop03", "crop-min 0.3: larger random crops, lesion crops at least 0.55 of the side", "lecl",
     (("views.crop_min", 0.3),)),
    ("f09", "lesion fraction 0.9", "lecl", (("lesion_fraction", 0.9),)),
    ("cache128", "crops cut from the cohort's full 128-px slices (--cache-size 128), then resized to 64", "lecl",
     (("cache_size", 128),)),
    ("frozen", "first layer frozen at its random init (--freeze-stem; MoCo v3's remedy, its Sec. 5)", "lecl",
     (("freeze_stem", True),)),
)


@dataclass(frozen=True)
class AblationConfig:
    base: config.AccuracyConfig = config.AccuracyConfig()  # the table's (module docstring: why not fewer steps)
    encoder: str = "cnn"  # the family whose LeCL row learns most in the table (module docstring)
    variants: tuple = VARIANTS


QUICK = AblationConfig(base=config.QUICK)  # a smoke test: every variant, at config.QUICK's small scale


def run(cfg, out, work, progress, log=print):
    """Every variant's row (accuracy.run_encoder), kept in `out`/rows/ and reported after each."""
    out, work = Path(out), Path(work)
    out.mkdir(parents=True, exist_ok=True)
    cohort = accuracy.open_cohort(cfg.base, work, progress)
    made = {"config": plain(asdict(cfg)), "machine": report.machine(cfg.base), "rows": []}
    flags = {}  # the probe's slice flags, shared by the rows
    for key, what, method, changes in cfg.variants:
        log(f"[ablation] {key}: {what}")
        vcfg = replace(cfg.base, pretrain_changes=cfg.base.pretrain_changes + changes)
        fingerprint = config.fingerprint(config.encoder_settings(vcfg, cfg.encoder, method))
        table = out / "rows" / f"{cfg.encoder}-{method}.json"  # no change: the table's own row, unless the table
        #                                                         kept one of other settings there (another scale)
        own = out / "rows" / f"ablation-{cfg.encoder}-{key}.json"
        path = table if not changes and _free(table, fingerprint) else own
        row = report.kept(path, fingerprint,
                          lambda: accuracy.run_encoder(vcfg, work, cohort, cfg.encoder, method, progress, flags),
                          log, "ablation")
        made["rows"].append({"variant": key, "changes": what, "pretrain": plain(changes), **row,
                             "train_flops": config.training_flops(vcfg, cfg.encoder, method, row["slices"])})
        write_report(made, out)
    return made


def _free(path, fingerprint):
    """Whether a row of `fingerprint` may be kept at `path`: nothing there yet, or a row of the same settings."""
    return not path.exists() or json.loads(path.read_text()).get("fingerprint") == fingerprint


def write_report(made, out):
    """`out`/ablation.json (everything) and ablation.md (the table), atomically."""
    with atomic_path(Path(out) / "ablation.json") as tmp:
        tmp.write_text(json.dumps(made, indent=1))
    steps = made["config"]["base"]["steps"]
    lines = [f"The {made['config']['encoder']} row of accuracy.md at {steps} pre-training steps, with LeCL's "
             "settings changed as each row says; compare each row with this table's lecl, moco and random rows. "
             "Columns as in accuracy.md.", "",
             "| variant | what changes | location | lung disease | stage | tumour-slice probe | rank | wall time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in made["rows"]:
        lines.append(report.md_row([r["variant"], r["changes"], *report.row_cells(r),
                                    f"{sum(r['seconds'].values()):.0f}"]))
    with atomic_path(Path(out) / "ablation.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
