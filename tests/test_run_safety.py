"""Run folders from a possibly hostile source: a crafted manifest, symlinks, two writers racing,
a torn metrics line, a full disk, a malformed checkpoint. Nothing outside the folder is touched,
nothing bpp did not write is removed, and every failure is one line (``error: ...``, exit 2)."""
import errno
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest
import torch

from bpp.errors import BppError
from bpp.locks import LOCK, Lock
from bpp.runs import MANIFEST, PARTIAL_MARKER, RunFolder
from tests.conftest import FAST_CLI as FAST
from tests.conftest import cli as _cli
from tests.conftest import one_line_error as _one_line_error
from tests.conftest import snapshot as _snapshot

PRUNE_FILES = ("mask.safetensors", "metrics.jsonl", "report.json", "config.json", "checkpoint.pt", "model")


def _victim(tmp_path: Path) -> Path:
    """A folder outside the run folder, with a file in it, that nothing may touch."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("mine")
    return victim


def _crafted(tmp_path: Path, job: str, files: list) -> Path:
    out = tmp_path / "crafted"
    out.mkdir()
    (out / "mask.safetensors").write_bytes(b"bpp wrote this")
    (out / MANIFEST).write_text(json.dumps({"tool": "bpp", "job": job, "files": ["mask.safetensors", *files]}))
    return out


def _bad_entries(tmp_path: Path, victim: Path) -> dict:
    link = tmp_path / "crafted-link-target"
    return {"dotdot": "../victim", "absolute": str(victim), "absolute-file": str(victim / "precious.txt"),
            "dot": ".", "empty": "", "nested": "sub/../../victim", "not-a-string": {"x": 1},
            "foreign-name": "notes.txt", "symlink": "model", "_link": link}


@pytest.mark.parametrize("job, files", [("prune", PRUNE_FILES), ("baseline", ("mask.safetensors", "report.json",
                                                                               "model")),
                                        ("recover", ("checkpoint.pt", "run.json"))])
@pytest.mark.parametrize("case", ["dotdot", "absolute", "absolute-file", "dot", "empty", "nested", "not-a-string",
                                  "foreign-name", "symlink"])
def test_force_never_removes_what_a_crafted_manifest_lists_outside_the_folder(tmp_path, job, files, case):
    victim = _victim(tmp_path)
    entry = _bad_entries(tmp_path, victim)[case]
    if case == "symlink" and "model" not in files:
        entry = files[0]
    out = _crafted(tmp_path, job, [entry])
    if case == "symlink":  # a listed name that is a symlink to a folder outside
        os.symlink(victim, out / entry)
    before_out, before_victim = _snapshot(out), _snapshot(victim)
    folder = RunFolder(out, job).open(force=True)
    try:
        with pytest.raises(BppError) as e:
            folder.claim(force=True, files=files)
    finally:
        folder.close(ok=False)
    assert "\n" not in str(e.value)
    assert _snapshot(victim) == before_victim and (victim / "precious.txt").read_text() == "mine"
    assert _snapshot(out) == before_out  # refused before anything was removed


def test_prune_force_with_a_crafted_manifest_is_one_line(tiny_llama_dir, tmp_path):
    victim = _victim(tmp_path)
    for entry in ("../victim", str(victim), "."):
        out = tmp_path / "crafted"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        (out / MANIFEST).write_text(json.dumps({"tool": "bpp", "job": "prune", "files": [entry]}))
        code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, "--force", *FAST)
        _one_line_error(code, err, "not a file name inside")
        assert (victim / "precious.txt").read_text() == "mine" and out.is_dir()


def test_force_removes_a_listed_model_folder_only_when_it_holds_only_bpps_files(run_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "model" / "my-notes.txt").write_text("mine")
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, "--force", *FAST)
    _one_line_error(code, err, "my-notes.txt")
    assert (out / "model" / "my-notes.txt").read_text() == "mine" and (out / "mask.safetensors").is_file()
    (out / "model" / "my-notes.txt").unlink()
    assert _cli("prune", "--model", tiny_llama_dir, "--out", out, "--force", *FAST)[0] == 0


def test_force_refuses_a_user_file_under_a_name_bpp_writes_but_did_not_record(run_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"].remove("metrics.jsonl")
    (out / MANIFEST).write_text(json.dumps(manifest))
    before = _snapshot(out)
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, "--force", *FAST)
    _one_line_error(code, err, "metrics.jsonl", "does not list it")
    assert _snapshot(out) == before


def test_user_entries_that_look_temporary_are_kept(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    (out / "report.json").unlink()
    mine = [out / ".notes.tmp", out / ".mine.old-1"]
    mine[0].write_text("mine")
    mine[1].mkdir()
    (mine[1] / "data.txt").write_text("mine")
    (out / ".model.old-7").mkdir()  # bpp's name, but not a model folder bpp wrote
    (out / ".model.old-7" / "data.txt").write_text("mine")
    theirs = out / ".model-abcd1234"  # what a killed compaction leaves
    theirs.mkdir()
    (theirs / PARTIAL_MARKER).write_text("")
    (out / ".config.json.tmp").write_text("{")
    assert _cli("prune", "--resume", out, "--quiet")[0] == 0
    assert mine[0].read_text() == "mine" and (mine[1] / "data.txt").read_text() == "mine"
    assert (out / ".model.old-7" / "data.txt").read_text() == "mine"
    assert not theirs.exists() and not (out / ".config.json.tmp").exists()


# --- one writer at a time ---------------------------------------------------------------------------

def _writer(path: str, start, done, results) -> None:
    start.wait(timeout=60)
    try:
        lock = Lock(Path(path), "race").acquire()
    except BppError:
        results.put("refused")
        done.wait(timeout=60)
        return
    results.put("held")
    done.wait(timeout=60)  # hold it until both have tried
    lock.release()


@pytest.mark.parametrize("stale", [True, False], ids=["over-a-stale-lock", "over-no-lock"])
def test_two_writers_started_together_never_both_hold_the_lock(tmp_path, stale):
    ctx = multiprocessing.get_context("fork")
    dead = ctx.Process(target=int)
    dead.start()
    dead.join()
    outcomes = []
    for trial in range(20):
        path = tmp_path / f"t{trial}" / LOCK
        path.parent.mkdir()
        if stale:  # left by a writer that was killed
            path.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "job": "prune"}))
        start, done, results = ctx.Barrier(2), ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_writer, args=(str(path), start, done, results)) for _ in range(2)]
        for p in procs:
            p.start()
        got = sorted(results.get(timeout=60) for _ in procs)
        for p in procs:
            p.join(timeout=60)
        outcomes.append(got)
    assert all(got == ["held", "refused"] for got in outcomes), outcomes


def test_a_lock_being_created_is_not_taken_as_stale(tmp_path):
    import fcntl

    path = tmp_path / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT)  # created and locked, its owner not yet written
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(BppError, match="in use"):
            Lock(path, "test").acquire()
    finally:
        os.close(fd)
    Lock(path, "test").acquire().release()  # its process let go without writing: free
    assert not path.exists()


def test_a_symlinked_lock_file_is_refused(tmp_path):
    target = tmp_path / "elsewhere"
    os.symlink(target, tmp_path / LOCK)
    with pytest.raises(BppError, match="symlink"):
        Lock(tmp_path / LOCK, "test").acquire()
    assert not target.exists()


# --- report follows the run-folder contract ----------------------------------------------------------

def test_report_refuses_to_overwrite_or_write_into_root(run_dir, tmp_path):
    out = tmp_path / "cmp"
    assert _cli("report", run_dir, "--out", out)[0] == 0
    (out / "report.md").write_text("edited")
    code, err = _cli("report", run_dir, "--out", out)
    _one_line_error(code, err, "--force")
    assert (out / "report.md").read_text() == "edited"
    assert _cli("report", run_dir, "--out", out, "--force")[0] == 0
    assert (out / "report.md").read_text().startswith("# bpp runs")
    assert json.loads((out / MANIFEST).read_text())["job"] == "report"
    code, err = _cli("report", run_dir, "--out", "/", "--force")
    _one_line_error(code, err, "current folder or one above it")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.md").write_text("mine")
    code, err = _cli("report", run_dir, "--out", mine, "--force")
    _one_line_error(code, err, "not written by bpp")
    assert (mine / "report.md").read_text() == "mine"


# --- files read back on resume --------------------------------------------------------------------

def _interrupted(run_dir: Path, tmp_path: Path) -> Path:
    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    (cut / "report.json").unlink()
    return cut


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoint.pt", "config.json"])
def test_resume_does_not_follow_a_symlink_out_of_the_folder(run_dir, tmp_path, name):
    cut = _interrupted(run_dir, tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    if name == "checkpoint.pt":  # a file read back: a copy outside, which must not be read
        shutil.copy(cut / name, outside / name)
    (cut / name).unlink()
    os.symlink(outside / name, cut / name)  # else dangling: appending through it would create it
    before = _snapshot(outside)
    code, err = _cli("prune", "--resume", cut, "--quiet")
    _one_line_error(code, err, "symlink")
    assert _snapshot(outside) == before


def test_a_torn_last_metrics_line_is_dropped_on_resume(run_dir, tmp_path):
    cut = _interrupted(run_dir, tmp_path)
    whole = (cut / "metrics.jsonl").read_text()
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "mean_lo')  # the disk filled up mid-line
    assert _cli("prune", "--resume", cut, "--quiet")[0] == 0
    assert (cut / "metrics.jsonl").read_text() == whole
    assert json.loads((cut / "report.json").read_text())["steps_done"] == 3


def test_a_corrupt_metrics_line_elsewhere_is_one_line(run_dir, tmp_path):
    cut = _interrupted(run_dir, tmp_path)
    lines = (cut / "metrics.jsonl").read_text().splitlines(keepends=True)
    (cut / "metrics.jsonl").write_text(lines[0] + '{"step": 1, "mean_lo\n' + "".join(lines[1:]))
    code, err = _cli("prune", "--resume", cut, "--quiet")
    _one_line_error(code, err, "metrics.jsonl line 2", "corrupt")


def test_read_jsonl(tmp_path):
    from bpp.fileio import read_jsonl

    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": ')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n[1]\n')
    with pytest.raises(BppError, match="line 2"):
        read_jsonl(path)


# --- a full disk -------------------------------------------------------------------------------------

def _full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    import bpp.checkpoints as checkpoints

    out = tmp_path / "full"
    real, calls = checkpoints.torch.save, []

    def fills_up(state, f):  # the third checkpoint runs out of space half-way
        calls.append(1)
        if len(calls) < 3:
            return real(state, f)
        f.write(b"PK\x03\x04 half")
        _full_disk()

    monkeypatch.setattr(checkpoints.torch, "save", fills_up)
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, "--checkpoint-every", "1", *FAST)
    _one_line_error(code, err, "checkpoint.pt", "no space left", "free space", "--resume")
    monkeypatch.undo()
    assert not list(out.glob(".*.tmp"))
    assert _cli("prune", "--resume", out, "--quiet")[0] == 0
    assert json.loads((out / "report.json").read_text())["steps_done"] == 3


def test_a_full_disk_while_saving_the_model_is_one_line_and_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def fills_up(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    out = tmp_path / "full"
    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", fills_up)
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, *FAST)
    _one_line_error(code, err, "no space left", "free space", "--resume")
    assert not (out / "model").exists() and not [p for p in out.iterdir() if p.name.startswith(".model-")]
    monkeypatch.setattr("safetensors.torch.save_file", fills_up)  # the mask file, this time
    code, err = _cli("prune", "--resume", out, "--quiet")
    _one_line_error(code, err, "mask.safetensors", "no space left", "--resume")
    monkeypatch.undo()
    assert _cli("prune", "--resume", out, "--quiet")[0] == 0
    assert (out / "model" / "config.json").is_file() and (out / "report.json").is_file()


# --- malformed but safe checkpoints ------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["no-config", "config-a-string", "no-step", "extra-a-string", "no-space",
                                    "policy-a-list", "no-policy"])
def test_a_malformed_checkpoint_is_one_line_naming_it(run_dir, tmp_path, damage):
    cut = _interrupted(run_dir, tmp_path)
    state = torch.load(cut / "checkpoint.pt", weights_only=True)
    if damage == "no-config":
        del state["config"]
    elif damage == "config-a-string":
        state["config"] = "sparsity=0.3"
    elif damage == "no-step":
        del state["step"]
    elif damage == "extra-a-string":
        state["extra"] = "job"
    elif damage == "no-space":
        del state["space"]
    elif damage == "policy-a-list":
        state["policy"] = [1, 2]
    else:
        del state["policy"]
    torch.save(state, cut / "checkpoint.pt")
    code, err = _cli("prune", "--resume", cut, "--quiet")
    _one_line_error(code, err, "checkpoint.pt", "not a usable bpp checkpoint")


# --- a killed export ---------------------------------------------------------------------------------

def test_an_export_removes_what_a_killed_export_of_the_same_file_left(tiny_llama_dir, tmp_path):
    from bpp.jobs.export import export_gguf

    leftover = tmp_path / ".small.gguf-k1ll3d00.tmp"  # tempfile's name for a killed export of small.gguf
    leftover.write_bytes(b"\0" * 4096)
    mine = [tmp_path / ".notes.tmp", tmp_path / ".other.gguf-k1ll3d00.tmp"]
    for path in mine:
        path.write_text("mine")
    export_gguf(tiny_llama_dir, tmp_path / "small.gguf", progress=False)
    assert (tmp_path / "small.gguf").is_file() and not leftover.exists()
    assert all(path.read_text() == "mine" for path in mine)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == sorted(p.name for p in mine)
