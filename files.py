"""Files as untrusted input and as output that is never half-written: the one error type of CLEAR, atomic writes,
and torch.load with weights_only=True.

    ClearError            a problem with the user's input or files: the CLI prints it as one line, exit code 2
    atomic_path(path)     write to a temporary file beside `path`, renamed onto it only when the write finished
    load_untrusted(path)  torch.load that reads tensors and plain data only, never a pickled object's code
    forked_map(fn, items, workers, what)  parallel work in forked processes (the cohort's scans, the folds): quiet on
                          Ctrl-C, one error if a worker dies
    map_folds(job, n, ...)  the folds of a fit, in this process or side by side in forked ones
    write_csv(path, rows) a list of dicts as CSV, atomically
    pick_device(name)     the torch.device for a --device option: "auto" is the GPU when there is one
    amp_dtype(device)     the autocast dtype of work on that device: None on CPU, bf16 or fp16 on a GPU

Every module that writes an output a user keeps (checkpoints, bags, fold models, metrics, NIfTI, reports) writes it
through `atomic_path`; every one that reads a checkpoint or a bag reads it through `load_untrusted`.
"""
import contextlib
import csv
import glob
import multiprocessing
import os
import pickle
import re
import signal
import socket
import tempfile
from pathlib import Path

import torch


class ClearError(Exception):
    """A problem with the user's input or files. The CLI prints it as one line and exits with code 2.
    By convention the message starts with the file it is about: "scans/a.nii.gz: not a NIfTI file"."""


def cause(e):
    """An exception as a short cause for a one-line message: its type and the first line of its text."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


UMASK = os.umask(0o022)  # read once (it can only be read by setting it), and put back at once
os.umask(UMASK)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, owned by another user
        pass
    return True


@contextlib.contextmanager
def atomic_path(path, clean=False):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block finishes.

    A crash or Ctrl-C inside the block leaves no half-written file under the final name (the rename is
    atomic on POSIX), and the temporary file is removed. A SIGKILL can leave it behind, under its own name
    ".<name>.<host>-<pid>.<random>.tmp", never under `path`. With `clean`, for the large files written again and
    again under one name (checkpoints: up to a GB left per killed save), this write first removes the ones whose
    process, on this host, is gone; it lists the folder, so it is not for the thousands of files of a bag folder.
    (Containers that share a host name and a disk but not their process ids should not write one checkpoint.)"""
    path = Path(path)
    host = socket.gethostname().replace(".", "_")
    for old in path.parent.glob(f".{glob.escape(path.name)}.{glob.escape(host)}-*.tmp") if clean else ():
        pid = old.name[len(f".{path.name}.{host}-"):].split(".")[0]
        try:
            if pid.isdigit() and not _alive(int(pid)):
                old.unlink(missing_ok=True)
        except (OSError, OverflowError):  # not ours to remove, or no pid at all: left as it is
            pass
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{host}-{os.getpid()}.", suffix=".tmp")
    except OSError as e:  # a read-only folder, a missing one, a file where the folder should be
        raise ClearError(f"{path}: cannot write ({e.strerror})") from None
    os.fchmod(fd, 0o666 & ~UMASK)  # mkstemp makes it owner-only; the file is to read as any file written here
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_untrusted(path, refusal):
    """torch.load a file that is untrusted input (a checkpoint, a bag, a fold model) with weights_only=True: only
    tensors and plain data are read; a pickled object that would run code is refused, never built. Any failure
    is one ClearError, "<path>: <refusal> (<cause>)", e.g. refusal = "cannot read bag"."""
    path = Path(path)
    if path.is_file() and path.stat().st_size == 0:
        raise ClearError(f"{path}: {refusal} (empty file)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # refused by weights_only (torch's own text advises weights_only=False)
        found = re.search(r"GLOBAL (\S+)", str(e))
        raise ClearError(f"{path}: {refusal}: it holds pickled Python objects{f' ({found[1]})' if found else ''} "
                         "that could run code when loaded; refused, only tensors and plain data are read") from None
    except Exception as e:  # not a torch file, truncated, ...
        raise ClearError(f"{path}: {refusal} ({cause(e)})") from None


def forked_map(fn, items, workers, what, ordered=True):
    """Yield fn(item) for `items`, computed in `workers` forked processes that ignore Ctrl-C (a terminal sends
    SIGINT to every process of its group; only the parent answers it, and leaving this generator terminates the
    pool, so Ctrl-C ends in the CLI's one line, not in a traceback from every worker as well). In order, or as
    they finish (ordered=False). A worker that dies (killed, out of memory) is one ClearError naming `what`:
    multiprocessing.Pool would quietly start another and wait forever for the lost item."""
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
        started = {p.pid for p in pool._pool}  # Pool's own list of its workers: a dead one is replaced within 0.1 s
        results = (pool.imap if ordered else pool.imap_unordered)(fn, items)
        for _ in range(len(items)):
            while True:
                try:
                    yield results.next(timeout=1.0)
                    break
                except multiprocessing.TimeoutError:
                    if {p.pid for p in pool._pool} != started:
                        raise ClearError(f"{what}: a worker process died (killed, or out of memory?); "
                                         "nothing of its work was kept") from None


def pick_device(name="auto"):
    """The torch.device for `--device name`: "auto" is the GPU when there is one, else the CPU. A GPU without an
    index is this process's own under torchrun (LOCAL_RANK), else the first, so that K processes use K GPUs. A GPU
    asked for where torch sees none or too few, or a name torch does not know, is one ClearError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ClearError(f"--device {name}: expected auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ClearError(f"--device {name}: no CUDA device is visible to torch here")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise ClearError(f"--device {name}: GPU {device.index} asked for (LOCAL_RANK {os.environ.get('LOCAL_RANK')}), "
                         f"torch sees {torch.cuda.device_count()}")
    return device


def amp_dtype(device):
    """The autocast dtype of work on `device`: None on the CPU (float32); on a GPU bfloat16 where it is native
    (compute capability 8.0 on), else float16, which training pairs with a GradScaler. torch.cuda.is_bf16_supported()
    counts emulated bfloat16 unless told not to, and emulated it is slow (V100, T4)."""
    if torch.device(device).type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def usable_cores():
    """The CPU cores this process may run on (taskset, cpusets) where the OS tells, else all of the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_FOLD_JOB = None  # what a forked worker runs: set just before the fork, which copies it (nothing is pickled)


def _forked_fold(k):
    torch.set_num_threads(1)
    return k, _FOLD_JOB(k, lambda n: None)


def map_folds(job, n, workers, epochs, bar=None):
    """[job(k, tick) for k in range(n)], in this process or in up to `workers` forked ones (0: one per CPU core
    this process may use). A worker runs one torch thread, whatever FitConfig.threads says; each fold seeds its
    own training, so the results are the same either way (tested), the timings are not. The bar ticks per epoch
    here, per finished fold from the workers; an error in a worker is raised here."""
    global _FOLD_JOB
    workers = min(n, workers or usable_cores())
    if workers == 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [job(k, bar.update if bar else lambda _: None) for k in range(n)]
    _FOLD_JOB, done = job, {}
    try:
        for k, result in forked_map(_forked_fold, range(n), workers, "fit", ordered=False):
            done[k] = result
            if bar:
                bar.update(epochs)
    finally:
        _FOLD_JOB = None
    return [done[k] for k in range(n)]


def write_csv(path, rows):
    """Rows (dicts with the same keys) -> CSV, written atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
