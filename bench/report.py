"""The accuracy benchmark's report: finished rows kept beside it (kept), and its tables, results/accuracy.md and
.json (write_report); bench/ablation.py writes its own table from the same cells.
"""
import json
import platform
from pathlib import Path

import torch

from bench.config import TASKS
from files import atomic_path


def machine(cfg):
    """This machine and the run's threads, for the report."""
    return (f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
            f"fit workers {cfg.fit.workers or 'one per core'}")


def kept(path, fingerprint, fn, log, tag="accuracy"):
    """fn()'s row, or the one an earlier run of the same settings left in `path` (JSON, written atomically)."""
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") == fingerprint:
            log(f"[{tag}] {path.stem}: finished by an earlier run, reused")
            return saved["row"]
    result = json.loads(json.dumps(fn()))  # as a re-run will read it back
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps({"fingerprint": fingerprint, "row": result}))
    return result


def _cell(t):
    return f"{t['value']:.3f} [{t['ci_low']:.2f}, {t['ci_high']:.2f}]" if t["value"] is not None else "n/a"


def md_row(cells):
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


def row_cells(r):
    """A slice-pipeline row's table cells: the three tasks' AUROCs, the tumour-slice probe and the rank."""
    probe = f"{r['probe']:.3f}" if r.get("probe") is not None else "n/a"
    rank = f"{r['effective_rank']:.1f}" if r.get("effective_rank") is not None else "n/a"
    return [_cell(r["tasks"][name]) for name in TASKS] + [probe, rank]


def write_report(report, out):
    """results/accuracy.json (everything) and results/accuracy.md (the tables), atomically."""
    with atomic_path(Path(out) / "accuracy.json") as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    lines = ["AUROC: mean over the 5 held-out folds of the macro AUROC over labels (location) or classes (stage), "
             "[95 % patient-bootstrap CI]. Tumour-slice probe: AUROC of a linear probe that finds the slices holding a "
             "tumour from the slice embeddings (held-out patients): does the encoder see lesions at all? Rank: the "
             "effective rank (RankMe) of the slice embeddings; near 1, the encoder has collapsed.", "",
             "| encoder | pre-training | location | lung disease | stage | tumour-slice probe | rank | wall time (s) "
             "| training FLOPs | peak memory |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        cells = [r["encoder"], r["method"], *row_cells(r), f"{sum(r['seconds'].values()):.0f}",
                 f"{r['train_flops']:.2g}", f"{r['peak_bytes'] / 2**30:.1f} GiB"]
        lines.append(md_row(cells))
    if report["efficiency"]:
        keys = [k for k in report["efficiency"][0] if k != "fraction"]
        lines += ["", "| training patients | " + " | ".join(f"{k}: {n}" for k in keys for n in TASKS) + " |",
                  "|---|" + "---|" * (len(keys) * len(TASKS))]
        for e in report["efficiency"]:
            values = [e[k][n]["value"] for k in keys for n in TASKS]
            lines.append(md_row([f"{e['fraction']:.0%}", *("n/a" if v is None else f"{v:.3f}" for v in values)]))
    if report.get("pending"):  # a run still going, or stopped: the tables above are not yet the whole report
        lines += ["", f"Still to run: {', '.join(report['pending'])}. The same command continues from the rows above "
                  "(kept in rows/)."]
    with atomic_path(Path(out) / "accuracy.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
