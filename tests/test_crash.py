"""Crash safety, on real processes: `python clear.py pretrain` and `python clear.py extract` killed
with SIGKILL mid-run, then run again (`--resume` / the same command), end with what an uninterrupted run
writes, bit for bit (CPU, same seed). While they run, every file under a final name in the output folder is
read back as soon as it appears or changes: each one must load (writes go to ".<name>.<host>-<pid>.<random>.tmp",
then are renamed; a SIGKILL may leave such a temporary file, never a partial file under the final name, and the
next write of that name removes it). Ctrl-C (SIGINT) stops with exit code 130 and one line saying how to continue.

The runs are small (4 scans of 32 x 32, a ViT-tiny at 32 px, one torch thread per process).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import clear
from files import UMASK, ClearError, forked_map
from test_hostile import shown

REPO = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")},
       "OMP_NUM_THREADS": "1"}  # the same threads in every run of a comparison; light on a shared machine
PRETRAIN = ["--img-size", "32", "--batch-size", "8", "--mlp-dim", "128", "--proj-dim", "64", "--lr", "0.02",
            "--steps", "16", "--checkpoint-every", "4", "--seed", "3", "--device", "cpu"]
EXTRACT = ["--encoder", "vit", "--random-init", "--img-size", "32", "--device", "cpu",
           "--batch-size", "1"]  # one slice per forward: slow enough (~1 s per scan) to be killed mid-cohort


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash") / "cohort"
    assert clear.main(["synth", "--out", str(root), "--n", "4", "--size", "32", "--thickness", "4", "5",
                       "--workers", "1"]) == 0
    return root


def start(log, *argv):
    """`python clear.py ARGV` in the background, stderr to the file `log` (a pipe could fill and stall it).
    SIGINT is reset to its default, as a terminal's would be, so Python turns it into KeyboardInterrupt."""
    with open(log, "w") as stderr:  # the child holds its own copy
        return subprocess.Popen([sys.executable, str(REPO / "clear.py"), *map(str, argv)], cwd=REPO, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=stderr,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def run(*argv):
    done = subprocess.run([sys.executable, str(REPO / "clear.py"), *map(str, argv)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def load(path):
    """Read a file the way its reader does; raise if it is partial or corrupt."""
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    if path.suffix == ".json":
        return json.loads(path.read_text())
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    if path.suffix == ".u8":  # the slice cache: raw bytes, as many as cache.json (written last) says
        meta = path.with_name("cache.json")
        if meta.exists():
            m = json.loads(meta.read_text())
            assert path.stat().st_size == m["n_slices"] * m["channels"] * m["size"] ** 2, path
        return None
    if path.name.endswith((".nii", ".nii.gz")):
        return nib.load(path).get_fdata()
    raise AssertionError(f"{path}: an unexpected file in the output folder")


class Watch:
    """Read back every file under a final name in `folders` each time it appears or changes."""

    def __init__(self, *folders):
        self.folders, self.seen, self.reads, self.latest = folders, {}, 0, {}

    def __call__(self):
        for folder in self.folders:
            for path in sorted(folder.rglob("*")) if folder.exists() else ():
                if path.name.startswith("."):  # a temporary name: not a result
                    continue
                try:
                    st = path.stat()
                except FileNotFoundError:  # replaced or removed between listing and looking
                    continue
                version = (st.st_ino, st.st_size, st.st_mtime_ns)
                if path.is_file() and self.seen.get(path) != version:
                    self.seen[path] = version
                    self.latest[path] = load(path)  # the test: what is visible under a final name is whole
                    self.reads += 1

    def until(self, proc, done, timeout=120):
        """Watch while `proc` runs, until done() is true; fails if the process ends first."""
        t0 = time.time()
        while True:
            ended = proc.poll() is not None  # first: a process that ends between the two checks is not early
            self()
            if done():
                return
            assert not ended, f"the process ended (exit {proc.returncode}) before the moment to stop it"
            assert time.time() - t0 < timeout
            time.sleep(0.01)


def step_of(path):
    return load(path)["step"] if path.exists() else 0


def state(ck):
    """Every tensor of a pre-training checkpoint: encoder, heads, momentum copies, AdamW's moments."""
    adam = ck["state"]["optimizer"]["state"]
    return {**{f"encoder.{k}": v for k, v in ck["encoder"].items()},
            **{f"state.{k}": v for k, v in ck["state"]["model"].items()},
            **{f"adam.{i}.{k}": v for i, s in adam.items() for k, v in s.items() if torch.is_tensor(v)}}


def test_pretrain_killed_then_resumed_equals_an_uninterrupted_run(cohort, tmp_path):
    run("pretrain", "--data", cohort, "--out", tmp_path / "whole" / "enc.pt", *PRETRAIN)
    out = tmp_path / "cut" / "enc.pt"  # its cache goes beside it (enc.pt.cache/), watched as well
    argv = ["pretrain", "--data", cohort, "--out", out, *PRETRAIN]
    proc, watch = start(tmp_path / "cut.log", *argv), Watch(out.parent)
    watch.until(proc, lambda: watch.latest.get(out, {}).get("step", 0) >= 8)  # the second checkpoint is there
    proc.kill()  # SIGKILL: no handler, no finally, no flush
    proc.wait()
    killed_at = step_of(out)
    assert 8 <= killed_at < 16 and watch.reads >= 4  # the cache's three files, one checkpoint or more
    watch()
    proc, watch = start(tmp_path / "resume.log", *argv, "--resume", out), Watch(out.parent)
    watch.until(proc, lambda: proc.poll() is not None)
    assert proc.returncode == 0, (tmp_path / "resume.log").read_text()[-3000:]
    whole, resumed = load(tmp_path / "whole" / "enc.pt"), load(out)
    assert resumed["step"] == 16 and resumed["losses"] == whole["losses"]  # exactly
    a, b = state(whole), state(resumed)
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert {p.name for p in out.parent.iterdir() if not p.name.startswith(".")} == {"enc.pt", "enc.pt.cache"}
    assert out.stat().st_mode & 0o777 == 0o666 & ~UMASK  # readable as any file written here, not owner-only


def test_extract_killed_mid_cohort_then_rerun_equals_an_uninterrupted_run(cohort, tmp_path):
    run("extract", "--data", cohort, "--out", tmp_path / "whole", *EXTRACT)
    bags = tmp_path / "cut"
    argv = ["extract", "--data", cohort, "--out", bags, *EXTRACT]
    proc, watch = start(tmp_path / "cut.log", *argv), Watch(bags)
    watch.until(proc, lambda: len(list(bags.glob("[!.]*.pt"))) >= 1)
    proc.kill()
    proc.wait()
    done_at_kill = sorted(p.name for p in bags.glob("[!.]*.pt"))
    assert 1 <= len(done_at_kill) < 4, done_at_kill
    proc, watch = start(tmp_path / "rerun.log", *argv), Watch(bags)
    watch.until(proc, lambda: proc.poll() is not None)
    assert proc.returncode == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    whole = {p.name: load(p) for p in (tmp_path / "whole").glob("*.pt")}
    cut = {p.name: load(p) for p in bags.glob("[!.]*.pt")}
    assert len(whole) == 4 and whole.keys() == cut.keys()
    for name, bag in whole.items():
        assert torch.equal(bag["features"], cut[name]["features"]) and torch.equal(bag["z_mm"], cut[name]["z_mm"])
        assert bag["encoder"] == cut[name]["encoder"] and bag["image"] == cut[name]["image"]
    assert load(bags / "manifest.json") == load(tmp_path / "whole" / "manifest.json")


@pytest.mark.parametrize("command", ["pretrain", "extract"])
def test_ctrl_c_stops_with_one_line_saying_how_to_continue(command, cohort, tmp_path):
    out = tmp_path / "out" / ("enc.pt" if command == "pretrain" else "bags")
    out.parent.mkdir()
    argv = [command, "--data", cohort, "--out", out, *(PRETRAIN if command == "pretrain" else EXTRACT)]
    proc, watch = start(tmp_path / "log", *argv), Watch(out.parent)
    watch.until(proc, (lambda: watch.latest.get(out, {}).get("step", 0) >= 4) if command == "pretrain" else
                (lambda: len(list(out.glob("[!.]*.pt"))) >= 1))
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    lines = shown((tmp_path / "log").read_text())
    assert len(lines) == 1, lines
    if command == "pretrain":  # the step running at Ctrl-C is finished and saved
        step = step_of(out)
        assert lines[0] == (f"clear.py pretrain: interrupted at step {step} of 16, checkpoint written; continue "
                            f"with the same options plus --resume {out}")
    else:
        assert lines[0] == ("clear.py extract: interrupted; finished files are kept, run the same command again "
                            "to continue")
        assert len(list(out.glob("[!.]*.pt"))) < 4
    assert not list(tmp_path.rglob(".*.tmp"))  # a polite stop removes its temporary file
    watch()


def test_a_write_removes_the_temporary_files_that_killed_writers_of_it_left(tmp_path):
    import socket
    import subprocess

    from files import atomic_path

    gone = subprocess.Popen(["true"])
    gone.wait()  # a process that has ended, as one SIGKILLed mid-save has
    host = socket.gethostname().replace(".", "_")
    dead, live = tmp_path / f".enc.pt.{host}-{gone.pid}.x1.tmp", tmp_path / f".enc.pt.{host}-{os.getppid()}.x2.tmp"
    other_file = tmp_path / f".enc.pt.cache.{host}-{gone.pid}.x3.tmp"  # another output's, of a longer name
    other_host = tmp_path / f".enc.pt.elsewhere-{gone.pid}.x4.tmp"  # a writer on another host (a shared disk)
    for p in (dead, live, other_file, other_host):
        p.write_bytes(b"partial")
    with atomic_path(tmp_path / "enc.pt") as tmp:  # without `clean` (a bag folder's writes) nothing is looked at
        tmp.write_bytes(b"first")
    assert dead.exists() and (tmp_path / "enc.pt").read_bytes() == b"first"
    with atomic_path(tmp_path / "enc.pt", clean=True) as tmp:  # as a checkpoint is written
        assert f".enc.pt.{host}-{os.getpid()}." in tmp.name
        tmp.write_bytes(b"whole")
    assert (tmp_path / "enc.pt").read_bytes() == b"whole"
    # only the orphan of this file, left by a process of this host that is gone; a live writer's is its own
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["enc.pt", live.name, other_file.name,
                                                                 other_host.name])


def test_ctrl_c_to_the_whole_process_group_is_still_one_line(tmp_path):
    """A terminal's Ctrl-C reaches the worker processes too (here synth's, drawing scans side by side): they stay
    quiet and the parent alone answers, in one line."""
    out, log = tmp_path / "cohort", tmp_path / "log"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(REPO / "clear.py"), "synth", "--out", str(out), "--n", "60",
                                 "--size", "64", "--workers", "2"], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                                stderr=stderr, process_group=0,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(list((out / "images").glob("*.nii.gz"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # as a terminal does: every process of the group
    assert proc.wait(timeout=60) == 130
    assert shown(log.read_text()) == ["clear.py synth: interrupted"]  # a re-run draws it again, with --force
    assert len(list((out / "images").glob("*.nii.gz"))) < 60


def _dies_on_two(i):
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return -i


def test_a_worker_killed_mid_map_is_one_error_not_a_wait_forever():
    def hung(*_):
        raise TimeoutError("forked_map waited 60 s for a dead worker's item")
    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    try:
        assert list(forked_map(_dies_on_two, [0, 1, 3], 2, "synth OUT")) == [0, -1, -3]  # in order
        with pytest.raises(ClearError) as e:
            list(forked_map(_dies_on_two, range(5), 2, "synth OUT", ordered=False))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    assert str(e.value).startswith("synth OUT: a worker process died") and "\n" not in str(e.value)
