"""Learning curves (`python benchmark.py learning`): what pre-training teaches a slice encoder, step by step.

For each method (LeCL, MoCo v3 and the supervised ceiling, pretrain.py's three), one pre-training run on the
corpus, stopped every `every` steps for a twin test (bench/probe.py) of its encoder on patients of the evaluation
cohort, a synthetic cohort of another seed, so none of them is in the corpus: each slice with a finding against
the same slice of its twin drawn without it. Step 0 is the random init, the floor, the same for every method
(same seed). A run is stopped through pretrain's `should_stop` and continued with `resume`, which ends with the
weights of an uninterrupted run, so the last point of a curve is the checkpoint `clear.py pretrain` would make.

    corpus (seed 7) --pretrain, stopped every K steps--> checkpoint --twin test on cohort (seed 0)--> AUROC

Writes learning.json (every point), learning.md (the table and the command), learning.svg (the curves) and, where
matplotlib is installed, learning.png. A re-run reuses the corpus, the slice cache and every finished point.
"""
import json
import shlex
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bench.probe import twin_probe, twin_slices
from cache import open_cache
from checkpoint import load_checkpoint, run_settings
from cli import bar
from data import SliceConfig, named_windows
from extract import EncoderSpec, load_encoder
from files import ClearError, atomic_path
from phantom import LUNG_EMPHYSEMA, LUNG_GGO, SynthConfig
from pretrain import METHODS, PretrainConfig, contrastive, pretrain
from synth import drawn
from views import ViewConfig

TUMOURS = tuple(range(1, 9))  # phantom's tumour labels, one per site
FINDINGS = {"ground glass": (LUNG_GGO,), "emphysema": (LUNG_EMPHYSEMA,), "tumours": TUMOURS}
TEST_SEED = 0  # the twin probe's patient folds: one test for every run, whatever its --seed


@dataclass(frozen=True)
class LearningConfig:
    corpus: SynthConfig = SynthConfig(n=600, seed=7, size=128, thickness=(4.0, 5.0))  # the demo's corpus: 498
    #                                                 patients, none of them the cohort's
    cohort: SynthConfig = SynthConfig(n=120, seed=0, size=128, thickness=(4.0, 5.0))  # the demo's cohort
    patients: int = 40  # the cohort's patients drawn for the twin test (those with each finding take part)
    encoder: str = "cnn"  # the demo's: the family that keeps the HU level (models/cnn.py)
    size: str = "micro"
    img_size: int = 64  # the demo's and the accuracy table's slices
    steps: int = 600  # per run: about 7 min for cnn-micro on 2 cores
    every: int = 100  # steps between twin tests
    batch_size: int = 128
    lr: float = 2e-3  # at batch 256 (AdamW, pretrain.lr_at scales it): a small model takes a large rate
    mlp_dim: int = 1024  # MoCo heads' hidden width: 4096 costs more than the micro encoder itself
    windows: tuple = ("lung", "soft", "bone", "parenchyma")  # data.WINDOWS by name, one input channel each: the
    #                  narrow parenchyma window is the one in which LeCL finds ground glass (docs/results.md)
    views: ViewConfig = ViewConfig()
    lesion_weight: float = PretrainConfig.lesion_weight  # LeCL's w (lecl.py): --lesion-weight 0 and 10 are the
    #                                                      curves of docs/results.md's "What LeCL's two parts do"
    temperature: float = PretrainConfig.temperature  # τ of the InfoNCE loss (lecl.py), LeCL and MoCo v3 alike
    lesion_labels: tuple | None = PretrainConfig.lesion_labels  # mask labels that LeCL takes for lesions (its
    #                                                           crops and hard negatives); None: any non-zero
    matched_levels: bool = True  # each batch from one height of the scans (views.batch_ids), so negatives share
    #                              their anatomy: LeCL finds ground glass with it (docs/results.md). Contrastive runs
    #                              only (pretrain.contrastive says why)
    levels: tuple | None = None  # (lo, hi): contrastive runs pre-train on the slices at these heights of the scans
    #                              alone (clear.py pretrain --levels; 0.52 0.88: the chest); None: every slice. The
    #                              supervised reference keeps every slice: its labels name tumours of every region
    methods: tuple = METHODS
    seed: int = 0
    device: str = "auto"

    def hu_windows(self):
        return named_windows(self.windows)  # (level, width) in HU per channel

    def pretrain_config(self, method):
        return PretrainConfig(encoder=self.encoder, size=self.size, method=method, steps=self.steps,
                              batch_size=self.batch_size, lr=self.lr, mlp_dim=self.mlp_dim, img_size=self.img_size,
                              views=self.views, lesion_weight=self.lesion_weight, temperature=self.temperature,
                              lesion_labels=self.lesion_labels, seed=self.seed,
                              levels=self.levels if contrastive(method) else None,
                              matched_levels=self.matched_levels and contrastive(method),
                              windows=self.hu_windows(),
                              device=self.device, checkpoint_every=self.every)


@dataclass
class Curves:
    points: dict = field(default_factory=dict)  # "method/step" -> {finding: AUROC}

    def add(self, method, step, aucs):
        self.points[f"{method}/{step}"] = aucs

    def has(self, method, step):
        return f"{method}/{step}" in self.points


def twin_aurocs(encoder, twins, seed):
    return {name: round(twin_probe(encoder, pairs, seed)[0], 4) for name, pairs in twins.items()}


def curve_key(cfg, method):
    """What one method's curve depends on: its pre-training run, the corpus and the twin test's patients. Kept
    points of a method whose key changed are dropped; a run of other methods or on another device keeps them."""
    return json.loads(json.dumps({"run": run_settings(cfg.pretrain_config(method)), "corpus": asdict(cfg.corpus),
                                  "cohort": asdict(cfg.cohort), "patients": cfg.patients, "every": cfg.every}))


def run(cfg, out, work, progress=None, log=lambda text: None):
    """Every curve of `cfg` -> Curves; learning.json is rewritten after each point, so a re-run continues, and
    holds the curves of every method run into `out`, whichever ran last. progress(desc, unit) -> ((iterable,
    total) -> iterable), as pretrain's: the corpus, the cache and each stretch of pre-training between tests."""
    if cfg.every < 1 or cfg.steps < 1:
        raise ClearError(f"--every {cfg.every}, --steps {cfg.steps}: both must be at least 1")
    out, work = Path(out), Path(work)
    done = {}  # method -> the step its checkpoint in `work` reached
    for method in cfg.methods:  # before anything is written: a checkpoint is never taken for another run's
        ckpt = work / f"{method}.pt"
        if ckpt.exists():
            ck = load_checkpoint(ckpt)
            if run_settings(ck["config"]) != run_settings(cfg.pretrain_config(method)):
                raise ClearError(f"{ckpt}: a run of other settings than this {method} curve's; use another --work")
            done[method] = ck["step"]
    out.mkdir(parents=True, exist_ok=True)
    record, curves, keys = out / "learning.json", Curves(), {}
    if record.exists():
        kept = json.loads(record.read_text())
        keys = {m: k for m, k in kept.get("keys", {}).items() if m not in cfg.methods or k == curve_key(cfg, m)}
        curves.points = {p: v for p, v in kept.get("points", {}).items() if p.split("/")[0] in keys}
    corpus = work / "corpus"
    if not (corpus / "labels.csv").exists():
        log(f"drawing the corpus: {cfg.corpus.n} scans (seed {cfg.corpus.seed}) into {corpus}")
    corpus_scans = drawn(cfg.corpus, corpus, *([progress("corpus", "scan")] if progress else []))
    twins = twin_slices(cfg.cohort, range(cfg.patients), FINDINGS, SliceConfig(cfg.hu_windows(), cfg.img_size))

    def save():
        with atomic_path(record) as tmp:
            tmp.write_text(json.dumps({"config": asdict(cfg), "keys": keys, "points": curves.points}, indent=1))

    def point(method, step, encoder):
        curves.add(method, step, twin_aurocs(encoder, twins, TEST_SEED))
        save()
        log(f"{method} step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in curves.points[f"{method}/{step}"].items()))

    random_init = EncoderSpec(name=cfg.encoder, size=cfg.size, img_size=cfg.img_size, seed=cfg.seed,
                              windows=cfg.hu_windows())
    for method in cfg.methods:
        pcfg, ckpt = cfg.pretrain_config(method), work / f"{method}.pt"
        keys[method] = curve_key(cfg, method)
        if not curves.has(method, 0):  # the random init: pretrain's own (the same seed builds the same encoder)
            point(method, 0, load_encoder(random_init)[0])
        step = done.get(method, 0)
        if step and not curves.has(method, step):  # stopped between its checkpoint and its twin test
            point(method, step, load_encoder(EncoderSpec(checkpoint=str(ckpt)))[0])
        cache = SliceConfig(pcfg.windows, pcfg.cache_size or pcfg.img_size, pcfg.thickness)  # pretrain's own
        open_cache(corpus_scans, work / "cache", cache, pcfg.lesion_labels, progress and progress("cache", "scan"))
        while step < cfg.steps:  # the cache is built above, so pretrain asks should_stop after each step alone
            left = [min(cfg.steps, (step // cfg.every + 1) * cfg.every) - step]

            def should_stop():
                left[0] -= 1
                return left[0] <= 0
            pretrain(pcfg, corpus, ckpt, resume=ckpt if step else None, cache=work / "cache", progress=progress,
                     should_stop=should_stop)
            step = load_checkpoint(ckpt)["step"]
            point(method, step, load_encoder(EncoderSpec(checkpoint=str(ckpt)))[0])
    return curves


# -------------------------------------------------------------------------------------------------- report

COLOURS = {"lecl": "#c0392b", "moco": "#2874a6", "supervised": "#229954"}
NAMES = {"lecl": "LeCL", "moco": "MoCo v3", "supervised": "supervised (ceiling)"}


def methods(curves):
    """The methods with points in `curves`, in METHODS' order."""
    return [m for m in METHODS if any(k.split("/")[0] == m for k in curves.points)]


def series(curves, method, finding):
    """[(step, AUROC)] of one curve, by step."""
    pts = [(int(k.split("/")[1]), v[finding]) for k, v in curves.points.items() if k.split("/")[0] == method]
    return sorted(pts)


def curves_svg(curves, cfg, width=300, height=220, pad=36):
    """One panel per finding: twin-test AUROC (0.3-1) against pre-training steps, a line per method."""
    panels = []
    for j, finding in enumerate(FINDINGS):
        def xy(step, auc):
            return (pad + (width - pad - 8) * step / cfg.steps, height - pad - (height - pad - 20) * (auc - 0.3) / 0.7)
        parts = [f'<g transform="translate({j * width},0)"><text x="{width / 2}" y="14" text-anchor="middle" '
                 f'font-size="13">{finding}</text>',
                 f'<rect x="{pad}" y="20" width="{width - pad - 8}" height="{height - pad - 20}" fill="none" '
                 'stroke="#999"/>']
        for v in (0.5, 0.7, 0.9):
            _, y = xy(0, v)
            parts.append(f'<line x1="{pad}" x2="{width - 8}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                         f'<text x="{pad - 4}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{v}</text>')
        for s in range(0, cfg.steps + 1, max(cfg.every, cfg.steps // 3)):
            x, _ = xy(s, 0.3)
            parts.append(f'<text x="{x:.1f}" y="{height - pad + 14}" font-size="10" text-anchor="middle">{s}</text>')
        parts.append(f'<text x="{(width + pad) / 2}" y="{height - 6}" font-size="10" text-anchor="middle">'
                     'pre-training step</text>')
        for method in methods(curves):
            pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, a) for s, a in series(curves, method, finding)
                                                          if a == a))
            parts.append(f'<polyline points="{pts}" fill="none" stroke="{COLOURS[method]}" stroke-width="2"/>')
        panels.append("".join(parts) + "</g>")
    legend = "".join(f'<text x="{10 + 170 * i}" y="{height + 16}" font-size="12" fill="{COLOURS[m]}">'
                     f'— {NAMES[m]}</text>' for i, m in enumerate(methods(curves)))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width * len(FINDINGS)}" height="{height + 24}" '
            f'font-family="sans-serif">{"".join(panels)}{legend}</svg>\n')


def write_png(curves, cfg, path):
    """learning.png through matplotlib, when it is installed (an optional extra: the SVG needs nothing)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(FINDINGS), figsize=(4 * len(FINDINGS), 3.2), sharey=True)
    for ax, finding in zip(axes, FINDINGS):
        for method in methods(curves):
            s, a = zip(*series(curves, method, finding))
            ax.plot(s, a, marker="o", ms=3, color=COLOURS[method], label=NAMES[method])
        ax.axhline(0.5, color="#999", lw=0.8, ls="--")
        ax.set(title=finding, xlabel="pre-training step", ylim=(0.3, 1.0))
    axes[0].set_ylabel("twin-test AUROC")
    axes[-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return True


def write_report(curves, cfg, out, command):
    """learning.md (the table and the command that made it), learning.svg and, with matplotlib, learning.png."""
    out = Path(out)
    with atomic_path(out / "learning.svg") as tmp:
        tmp.write_text(curves_svg(curves, cfg))
    png = write_png(curves, cfg, out / "learning.png")
    steps = sorted({int(k.split("/")[1]) for k in curves.points})
    lines = [f"Twin-test AUROC of {cfg.encoder}-{cfg.size} at {cfg.img_size} px against pre-training steps (batch "
             f"{cfg.batch_size}) on a corpus of {cfg.corpus.n} synthetic scans (seed {cfg.corpus.seed}); the twin test "
             f"on patients 0-{cfg.patients - 1} of the evaluation cohort (seed {cfg.cohort.seed}), none of them in the "
             "corpus. Step 0 is the random init. Made by:", "", f"    {command}", "",
             f"![learning curves](learning.{'png' if png else 'svg'})", "",
             "| method | finding | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|---|" + "---:|" * len(steps)]
    for method in methods(curves):
        for finding in FINDINGS:
            got = dict(series(curves, method, finding))
            lines.append(f"| {NAMES[method]} | {finding} | "
                         + " | ".join("" if s not in got else f"{got[s]:.3f}" for s in steps) + " |")
    with atomic_path(out / "learning.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")


# ------------------------------------------------------------------------------------------------- command


# the LearningConfig fields that benchmark.py learning's options set
OPTIONS = ("encoder", "size", "img_size", "steps", "every", "batch_size", "lesion_weight", "temperature",
           "lesion_labels", "matched_levels", "levels", "windows", "seed", "device")


def config_from(args):
    """The LearningConfig of `benchmark.py learning`'s options: LearningConfig's defaults where none is given."""
    given = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    given |= {k: tuple(getattr(args, k)) for k in ("windows", "lesion_labels", "levels") if getattr(args, k)}
    return replace(LearningConfig(), **given, **({"methods": tuple(args.methods)} if args.methods else {}))


def command_line(cfg, out):
    """The command that makes the curves of `cfg` in `out`: each option whose value is not the default. Not the
    command just run: learning.json gathers the methods of several runs, each with its own --methods (and
    --work, where the files of the run go), so what makes the whole table is the command without them."""
    default, parts = LearningConfig(), ["python", "benchmark.py", "learning"]
    for k in OPTIONS:
        if (value := getattr(cfg, k)) != getattr(default, k):
            flag = f"--{'no-' if value is False else ''}{k.replace('_', '-')}"  # a switch: --x or --no-x
            parts += [flag] + ([] if isinstance(value, bool) else [str(v) for v in value] if isinstance(value, tuple)
                               else [str(value)])
    return shlex.join(parts + (["--out", str(out)] if str(out) != "results" else []))


def command(args):
    """Learning curves of LeCL, MoCo v3 and the supervised ceiling (bench/learning.py): results/learning.md."""
    cfg, out = config_from(args), args.out or "results"
    curves = run(cfg, out, args.work or f"{out}/work-learning", progress=bar, log=print)
    write_report(curves, cfg, out, command_line(cfg, out))
    print(f"learning curves in {out}/learning.md")
