"""What clear.py and benchmark.py share as command-line tools: progress bars, the one-line error and its exit
code, the output folder's checks, and options made from a config dataclass's fields.

    add_options(parser, PretrainConfig, ("steps", "lr"))   # --steps, --lr: type and default from the fields,
                                                            # help from the comment beside each
    cfg = config_from(PretrainConfig, args)                 # and back
"""
import contextlib
import dataclasses
import inspect
import re
import shutil
import signal
import sys
import tempfile
import types
from pathlib import Path

from tqdm import tqdm

from data import WINDOWS
from files import ClearError

BARS = []  # the progress bars this process drew; end_bars() closes those left open


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar on stderr, remembered for end_bars()."""
    BARS.append(tqdm(iterable, dynamic_ncols=True, **kwargs))
    return BARS[-1]


def end_bars():
    """Close the bars still open (an error or Ctrl-C stopped their loop): each ends its line, so the message
    printed next stands on a line of its own instead of being glued to the end of a bar."""
    while BARS:
        BARS.pop().close()


def bar(desc, unit="scan"):
    """A tqdm progress bar factory for library functions that take `progress(iterable, total)`."""
    return lambda it, total: progress_bar(it, total=total, desc=desc, unit=unit)


def run_command(prog, args):
    """args.func(args) as a command-line tool: a ClearError becomes one line and exit code 2, Ctrl-C one line and
    130 (saying how to continue, unless the subcommand set resumes=False: it writes nothing to continue from);
    either way the progress bars still open are closed first. clear.py's and benchmark.py's main."""
    try:
        args.func(args)
    except ClearError as e:
        end_bars()
        one_line = " / ".join(line.strip() for line in str(e).splitlines() if line.strip())  # should one slip in
        print(f"{prog} {args.cmd}: error: {one_line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        end_bars()
        how = "; finished files are kept, run the same command again to continue" if getattr(args, "resumes", True) \
            else ""
        print(f"{prog} {args.cmd}: interrupted{how}", file=sys.stderr)
        return 130
    return 0


def prepare_out_dir(out, force, owned=()):
    """Refuse an --out that exists and is not empty unless --force; with --force remove only the `owned` glob
    patterns (what this subcommand itself writes there), never anything else of the user's."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ClearError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ClearError(f"{out}: exists and is not empty (use --force to overwrite)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # writable? Found out now, not after the work; as root, only
    except OSError as e:                         # this finds a read-only mount or an immutable folder
        raise ClearError(f"{out}: cannot create folder or write in it ({e.strerror})") from None
    for pattern in owned if force else ():
        for p in out.glob(pattern):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


@contextlib.contextmanager
def removed_on_failure(out):
    """Within the block, the topmost folder of `out` that does not exist yet is removed again if the block fails
    (an error, Ctrl-C): a run is whole or absent."""
    created = Path(out).absolute()
    while not created.parent.exists():
        created = created.parent
    created = None if created.exists() else created
    try:
        yield
    except BaseException:
        if created:
            shutil.rmtree(created, ignore_errors=True)
        raise


@contextlib.contextmanager
def first_ctrl_c_asks_to_stop():
    """Yield should_stop(), true once Ctrl-C was pressed: the first one asks the work to stop at its next
    checkpoint, a second one stops at once (KeyboardInterrupt)."""
    asked = []

    def on_sigint(signum, frame):
        asked.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield lambda: bool(asked)
    finally:
        signal.signal(signal.SIGINT, previous)


# ------------------------------------------------------------------------------ options from config dataclasses


def config_from(cls, args, **overrides):
    """Fill the dataclass `cls` from the parsed arguments that share its field names."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**{**given, **overrides})


def field_comments(cls):
    """field name -> the comment beside it in `cls`'s source, its continuation lines (comment-only) included."""
    comments, name = {}, None
    for line in inspect.getsource(cls).splitlines():
        field = re.match(r"\s{4}(\w+)\s*:[^#]*?(?:  # (.*))?$", line)
        if field:
            name = field[1]
            comments[name] = field[2] or ""
        elif name and line.strip().startswith("#"):
            comments[name] += " " + line.strip().lstrip("#").strip()
        else:
            name = None
    return comments


def add_options(parser, cls, names, **changes):
    """One --option per field in `names` of the config dataclass `cls`: its type and default from the field (a
    bool is a flag, a tuple takes several values), its help from the comment beside it. `changes[name]`: keywords
    of add_argument that replace the derived ones."""
    fields, comments = {f.name: f for f in dataclasses.fields(cls)}, field_comments(cls)
    for name in names:
        f = fields[name]
        kinds = [t for t in f.type.__args__ if t is not type(None)] if isinstance(f.type, types.UnionType) else [f.type]
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else f.default
        help = comments.get(name, "") + ("" if f.default in (None, False) else f" (default {shown})")
        if kinds[0] is bool:
            kw = {"action": "store_true"}
        elif kinds[0] is tuple:
            kw = {"nargs": "+", "type": type(f.default[0]) if f.default else str, "default": f.default}
        else:
            kw = {"type": kinds[0], "default": f.default}
        parser.add_argument(f"--{name.replace('_', '-')}", **{"help": help.strip(), **kw, **changes.get(name, {})})


def add_windows(parser, default, note=""):
    """--windows: HU windows by name (data.WINDOWS), one input channel each; `default` as the help shows it."""
    parser.add_argument("--windows", nargs="+", choices=WINDOWS, metavar="NAME",
                        help=f"HU windows, one input channel each, from {', '.join(WINDOWS)} (data.WINDOWS; default "
                             f"{default}){note}")
