"""CLEAR command line: the only entry point, the only place that parses arguments or prints for the user.

    python clear.py synth --out data/synth           # a synthetic CT cohort with known findings

Every subcommand reads the same way: inputs (--data, --bags, ...), --out, then options that map one to one
onto the fields of a config dataclass of the module doing the work. A problem with the input is reported
as one line naming the file, with exit code 2.
"""
import argparse
import dataclasses
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from data import ClearError


def config_from(cls, args, **overrides):
    """Fill the dataclass `cls` from the parsed arguments that share its field names."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})


def prepare_out_dir(out, force, owned=()):
    """Refuse an --out that exists and is not empty unless --force; with --force remove only `owned` entries
    (what this subcommand itself writes there), never anything else of the user's."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClearError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ClearError(f"{out}: exists and is not empty (use --force to overwrite)")
        for name in owned:
            p = out / name
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ClearError(f"{out}: cannot create folder ({e.strerror})") from None
    return out


def bar(desc, unit="scan"):
    """A tqdm progress bar factory for library functions that take `progress(iterable, total)`."""
    return lambda it, total: tqdm(it, total=total, desc=desc, unit=unit, dynamic_ncols=True)


# --------------------------------------------------------------------------------------------- synth


def cmd_synth(args):
    from phantom import SynthConfig, write_cohort, ENDPOINTS

    cfg = config_from(SynthConfig, args, thickness=tuple(args.thickness))
    if cfg.n < 1 or cfg.size < 32 or cfg.workers < 1:
        raise ClearError(f"--n must be >= 1, --size >= 32 and --workers >= 1 (got {cfg.n}, {cfg.size}, "
                         f"{cfg.workers})")
    out = prepare_out_dir(args.out, args.force, owned=("images", "masks", "labels.csv", "synth.json"))
    t0 = time.time()
    rows = write_cohort(cfg, out, progress=bar("synth"))
    print(f"wrote {len(rows)} scans of {len({r['patient'] for r in rows})} patients to {out} "
          f"in {time.time() - t0:.0f} s")
    print("label balance (positives / scans):  " + "  ".join(
        f"{k}={sum(r[k] > 0 for r in rows)}" for k in ENDPOINTS))
    print("stage counts 0-3: " + " ".join(str(sum(r["stage"] == s for r in rows)) for s in range(4)))


def add_synth(sub):
    from phantom import SynthConfig

    d = SynthConfig()
    p = sub.add_parser("synth", help="generate a synthetic CT cohort with known findings",
                       description="Draw a synthetic neck-to-pelvis CT cohort (NIfTI in HU, lesion masks, "
                                   "labels.csv) posing tumour location, lung disease and staging.")
    p.add_argument("--out", required=True, help="cohort folder to create")
    p.add_argument("--n", type=int, default=d.n, help=f"number of scans (default {d.n})")
    p.add_argument("--seed", type=int, default=d.seed, help="same seed, same files")
    p.add_argument("--size", type=int, default=d.size, help=f"in-plane grid (default {d.size})")
    p.add_argument("--thickness", type=float, nargs=2, default=d.thickness, metavar=("MIN", "MAX"),
                   help="slice thickness range in mm (default 1 5)")
    p.add_argument("--contrast", type=float, default=d.contrast,
                   help="difficulty: scales lesion contrast to host tissue (default 1)")
    p.add_argument("--lesion-scale", type=float, default=d.lesion_scale,
                   help="difficulty: scales lesion diameters (default 1: 5-30 mm)")
    p.add_argument("--workers", type=int, default=d.workers, help="parallel processes")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    p.set_defaults(func=cmd_synth)


# ---------------------------------------------------------------------------------------------- main


def build_parser():
    parser = argparse.ArgumentParser(prog="clear.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    for add in (add_synth,):
        add(sub)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ClearError as e:
        print(f"clear.py {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nclear.py {args.cmd}: interrupted; finished files are kept, run the same command again "
              "to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
