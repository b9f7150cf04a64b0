"""Run folders and bad input: nothing lost, nothing run that the user did not ask for.

Each test reproduces a defect a demanding user hit (a crafted checkpoint, --force over foreign
files, flags ignored on resume, two writers, a mask of another model, a half-saved compacted
model, tracebacks instead of one line) and checks the contract of :mod:`bpp.runs` now holds."""
import errno
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bpp
from bpp.errors import BppError
from bpp.checkpoints import load_checkpoint
from bpp.fileio import atomic_file
from bpp.locks import LOCK, Lock
from bpp.runs import MANIFEST, PARTIAL_MARKER, RunFolder
from tests.conftest import FAST_CLI as FAST
from tests.conftest import cli as _cli
from tests.conftest import one_line_error as _one_line_error
from tests.conftest import snapshot as _snapshot
from tests.tiny import tiny_model, tiny_tokenizer

# --- 1. checkpoints never run code ------------------------------------------------------------------

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_checkpoint_is_refused_without_running_anything(run_dir, tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", MANIFEST):
        (bad / name).write_bytes((run_dir / name).read_bytes())
    with open(bad / "checkpoint.pt", "wb") as f:
        pickle.dump({"config": _Payload(marker)}, f)
    code, err = _cli("prune", "--resume", bad, "--quiet")
    _one_line_error(code, err, "checkpoint.pt", "refusing to load it")
    assert not marker.exists()
    with pytest.raises(BppError, match="not a bpp checkpoint"):
        load_checkpoint(bad / "checkpoint.pt")
    assert not marker.exists()


def test_real_checkpoints_load_with_weights_only(run_dir):
    state = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3 and state["policy"]["name"] == "allocation"  # the default policy learns an allocation
    alloc = state["policy"]  # offsets, groups, Adam, group statistics: plain data
    assert "theta" not in alloc and alloc["offsets"].dtype == torch.float64
    assert alloc["optimizer"]["m"].shape == alloc["optimizer"]["v"].shape
    assert state["incumbent"]["window_losses"].dtype == torch.float64


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"], ids=["empty", "truncated"])
def test_an_empty_or_truncated_checkpoint_is_one_line(run_dir, tmp_path, content):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "checkpoint.pt").write_bytes(content)
    code, err = _cli("prune", "--resume", broken, "--quiet")
    _one_line_error(code, err, "checkpoint.pt", "truncated or corrupt")
    assert "Aborted" not in err


# --- 2. --force replaces only what bpp wrote, after the inputs are checked ---------------------------

def test_force_refuses_a_folder_bpp_did_not_write(tiny_llama_dir, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text("{\"my\": 1}")
    (mine / "report.json").write_text("[]")
    before = _snapshot(mine)
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", mine, "--force", *FAST)
    _one_line_error(code, err, "not written by bpp")
    assert _snapshot(mine) == before


def test_force_checks_every_input_before_removing_anything(run_dir, tiny_llama_dir, tmp_path):
    before = _snapshot(run_dir)
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", run_dir, "--force",
                     "--data", tmp_path / "missing.txt", *FAST)
    _one_line_error(code, err, "missing.txt")
    assert _snapshot(run_dir) == before


def test_out_may_not_be_or_hold_the_model(tiny_llama_dir, tmp_path):
    before = _snapshot(tiny_llama_dir)
    for out in (tiny_llama_dir, tiny_llama_dir.parent):
        code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, "--force", *FAST)
        _one_line_error(code, err, "holds the input")
    assert _snapshot(tiny_llama_dir) == before


def test_out_may_not_be_the_current_folder(run_dir, tiny_llama_dir, tmp_path, monkeypatch):
    here = tmp_path / "here"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    code, err = _cli("compact", "--mask", run_dir / "mask.safetensors", "--model", tiny_llama_dir, "--out", ".",
                     "--force")
    _one_line_error(code, err, "current folder")
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", ".", "--force", *FAST)
    _one_line_error(code, err, "current folder")
    assert sorted(os.listdir(here)) == ["notes.txt"]


def test_compact_force_replaces_only_a_model_folder_bpp_wrote(run_dir, tiny_llama_dir, tmp_path):
    mask = run_dir / "mask.safetensors"
    out = tmp_path / "small"
    assert _cli("compact", "--mask", mask, "--model", tiny_llama_dir, "--out", out)[0] == 0
    assert json.loads((out / MANIFEST).read_text())["job"] == "model"
    assert _cli("compact", "--mask", mask, "--model", tiny_llama_dir, "--out", out, "--force")[0] == 0
    (out / "my-notes.txt").write_text("mine")
    code, err = _cli("compact", "--mask", mask, "--model", tiny_llama_dir, "--out", out, "--force")
    _one_line_error(code, err, "my-notes.txt")
    assert (out / "my-notes.txt").read_text() == "mine"


def test_a_failed_run_leaves_no_empty_folder(tiny_llama_dir, tmp_path):
    out = tmp_path / "never"
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, "--data", tmp_path / "missing.txt", *FAST)
    _one_line_error(code, err, "missing.txt")
    assert not out.exists()


# --- 3. flags given with --resume ---------------------------------------------------------------------

def _interrupted_copy(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    cut = tmp_path / "cut"
    shutil.copytree(run_dir, cut)
    (cut / "report.json").unlink()
    return cut


def test_resume_refuses_flags_that_differ_from_the_run(run_dir, tmp_path):
    cut = _interrupted_copy(run_dir, tmp_path)
    code, err = _cli("prune", "--resume", cut, "--sparsity", "0.5", "--quiet")
    _one_line_error(code, err, "--sparsity: 0.5 given, the run has 0.3")
    code, err = _cli("prune", "--resume", cut, "--sparsity", "0.3", "--quiet")  # the same value is fine
    assert code == 0, err


def test_recover_resume_refuses_flags_that_differ(tmp_path):
    from bpp.jobs.recover import _resolve_run

    saved = {"model": "/m", "data": "default", "dtype": "float32", "checkpoint_every": 10, "evaluate": True,
             "eval_windows": None, "eval_seq_len": 128, "recover": bpp.recover.__globals__["RecoverConfig"]().to_dict()}
    with pytest.raises(BppError, match=r"steps: 50 \(interrupted run\) vs 7 \(now\)"):
        _resolve_run(None, None, {"steps": 7}, saved)
    assert _resolve_run(None, None, {"eval_windows": 3}, saved)["eval_windows"] == 3  # may change, applied


def test_resume_restores_the_evaluation_options(tiny_llama_dir, tmp_path):
    out = tmp_path / "ev"
    args = ["prune", "--model", tiny_llama_dir, "--out", out, *[a for a in FAST if a != "--no-eval"],
            "--eval-windows", "2", "--eval-seq-len", "16"]
    assert _cli(*args)[0] == 0
    first = json.loads((out / "report.json").read_text())
    (out / "report.json").unlink()
    assert _cli("prune", "--resume", out, "--quiet")[0] == 0
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["perplexity"]["max_windows"] == 2 and resumed["perplexity"]["seq_len"] == 16
    assert resumed["perplexity"]["final_mask"] == first["perplexity"]["final_mask"]
    (out / "report.json").unlink()
    assert _cli("prune", "--resume", out, "--quiet", "--eval-windows", "3")[0] == 0  # changed: applied, recorded
    again = json.loads((out / "report.json").read_text())
    assert again["perplexity"]["max_windows"] == 3 and again["job_changes_on_resume"][-1]["eval_windows"] == 3


# --- 4. one writer at a time --------------------------------------------------------------------------

def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(run_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "job": "prune"}))
        code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, *FAST)
        _one_line_error(code, err, "in use by another bpp prune", str(sleeper.pid))
    finally:
        sleeper.kill()
        sleeper.wait()
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, *FAST)  # its process is gone: stale
    assert code == 0, err
    assert not (out / LOCK).exists() and (out / "mask.safetensors").is_file()


def test_two_runs_started_together_do_not_mix(tiny_llama_dir, tmp_path):
    out = tmp_path / "race"
    cmd = [sys.executable, "-m", "bpp", "prune", "--model", str(tiny_llama_dir), "--out", str(out), *FAST]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([*cmd, "--seed", str(seed)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for seed in (1, 2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    winners = [r for r in results if r[0] == 0]
    assert len(winners) == 1, results
    loser = next(r for r in results if r[0] != 0)
    assert "in use by another bpp" in loser[1] or "already exists" in loser[1], loser[1]
    config = json.loads((out / "config.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert config["seed"] == report["config"]["seed"]


def test_atomic_file_replaces_only_with_a_complete_file(tmp_path):
    target = tmp_path / "big.bin"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]
    with atomic_file(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".big.bin-") and tmp.name.endswith(".tmp")
        with open(tmp, "wb") as f:
            for _ in range(3):
                f.write(b"part")
    assert target.read_bytes() == b"partpartpart" and sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]


def test_lock_release_and_owner_check(tmp_path):
    lock = Lock(tmp_path / LOCK, "test").acquire()
    with pytest.raises(BppError, match="in use"):
        Lock(tmp_path / LOCK, "test").acquire()
    lock.release()
    Lock(tmp_path / LOCK, "test").acquire().release()
    assert not (tmp_path / LOCK).exists()


# --- 5. a mask belongs to its model --------------------------------------------------------------------

def test_a_mask_of_another_model_is_refused(run_dir, tiny_llama_dir, tmp_path):
    other = tmp_path / "other"
    tiny_model("llama", seed=5).save_pretrained(other)  # same shapes, other weights
    tiny_tokenizer().save_pretrained(other)
    mask = run_dir / "mask.safetensors"
    code, err = _cli("compact", "--mask", mask, "--model", other, "--out", tmp_path / "x")
    _one_line_error(code, err, "made for another model", "--allow-other-model")
    assert not (tmp_path / "x").exists()
    assert _cli("compact", "--mask", mask, "--model", other, "--out", tmp_path / "y", "--allow-other-model")[0] == 0
    # the same model in another dtype is the same model
    assert _cli("compact", "--mask", mask, "--model", tiny_llama_dir, "--out", tmp_path / "z",
                "--dtype", "bfloat16")[0] == 0


# --- 6. the compacted model saves itself completely ---------------------------------------------------

def test_save_pretrained_of_a_compacted_model_loads_without_bpp(tmp_path):
    model = tiny_model("qwen2")
    space = bpp.MaskSpace.from_model(model)
    masks = bpp.Masks.full(space, 1)
    masks.channels[0, 0, :25] = False
    masks.groups[0, 1, 0] = False
    small = bpp.compact(model, masks)
    small.save_pretrained(tmp_path / "saved")
    tiny_tokenizer().save_pretrained(tmp_path / "saved")
    ids = torch.arange(11).unsqueeze(0)
    with torch.no_grad():
        torch.save(small(ids).logits, tmp_path / "want.pt")
    script = f"""
import sys, torch
sys.modules["bpp"] = None  # a process where bpp cannot be imported
import builtins
builtins.input = lambda *a: (_ for _ in ()).throw(AssertionError("transformers asked about custom code"))
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(tmp_path / 'saved')!r})  # no custom-code prompt
m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'saved')!r}, trust_remote_code=True)
got = m(torch.arange(11).unsqueeze(0)).logits
assert torch.allclose(got, torch.load({str(tmp_path / 'want.pt')!r}), atol=1e-5), "logits differ"
print("ok", type(tok).__name__)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-2000:]


def test_folders_of_earlier_bpp_versions_still_load(tmp_path):
    """A per-layer-size folder as bpp wrote it before (model type bpp_pruned_llama, its modeling
    file as then shipped, kept in tests/data) loads through bpp with the same logits."""
    model = tiny_model("llama")
    space = bpp.MaskSpace.from_model(model)
    masks = bpp.Masks.full(space, 1)
    masks.channels[0, 1, :20] = False
    out = tmp_path / "old"
    bpp.compact(model, masks, out, tokenizer=tiny_tokenizer())
    config = json.loads((out / "config.json").read_text())
    config["model_type"] = "bpp_pruned_llama"
    (out / "config.json").write_text(json.dumps(config))
    template = (Path(__file__).parent / "data" / "modeling_bpp_v1.py").read_text()
    (out / "modeling_bpp.py").write_text(template.replace("FAMILY", "llama").replace("Family", "Llama"))
    loaded, _ = bpp.load_model(out)
    ids = torch.arange(9).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, bpp.compact(model, masks)(ids).logits, atol=1e-5)
    (out / "modeling_bpp.py").write_text(template.replace("FAMILY", "llama").replace("Family", "Llama") + "\n# edited")
    with pytest.raises(BppError, match="differs from the modeling file"):
        bpp.load_model(out)


# --- 7. one line, exit code 2, nothing lost ------------------------------------------------------------

@pytest.mark.parametrize("device, needle", [("cuda", "no CUDA device"), ("tpu", "unknown device"),
                                            ("bogus", "unknown device")])
def test_unusable_devices(tiny_llama_dir, tmp_path, device, needle):
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", tmp_path / "d", "--device", device, *FAST)
    _one_line_error(code, err, needle)
    assert not (tmp_path / "d").exists()
    code, err = _cli("eval", "--model", tiny_llama_dir, "--device", device)
    _one_line_error(code, err, needle)


@pytest.mark.parametrize("content", [b"", b"garbage that is not safetensors", None], ids=["empty", "garbage", "cut"])
def test_bad_mask_files(run_dir, tiny_llama_dir, tmp_path, content):
    bad = tmp_path / "mask.safetensors"
    good = (run_dir / "mask.safetensors").read_bytes()
    bad.write_bytes(good[: len(good) // 2] if content is None else content)
    code, err = _cli("compact", "--mask", bad, "--model", tiny_llama_dir, "--out", tmp_path / "o")
    _one_line_error(code, err, str(bad))
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_model_folder_with_damaged_weights(tiny_llama_dir, tmp_path, damage):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama_dir, broken)
    weights = broken / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    else:
        weights.write_bytes(weights.read_bytes()[:1000])
    code, err = _cli("eval", "--model", broken)
    _one_line_error(code, err, str(broken))


def test_a_full_disk_is_one_line_and_the_run_resumes(tiny_llama_dir, tmp_path, monkeypatch):
    import bpp.runs as runs

    out = tmp_path / "full"
    real = runs.atomic_write_json

    def full_at_report(path, obj):
        if Path(path).name == "report.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, obj)

    monkeypatch.setattr("bpp.jobs.prune.atomic_write_json", full_at_report)
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", out, *FAST)
    _one_line_error(code, err, "report.json", "no space left", "--resume")
    assert (out / "checkpoint.pt").is_file() and (out / "mask.safetensors").is_file()
    monkeypatch.undo()
    assert _cli("prune", "--resume", out, "--quiet")[0] == 0
    assert json.loads((out / "report.json").read_text())["steps_done"] == 3


def test_a_read_only_output_is_one_line(tiny_llama_dir, tmp_path, monkeypatch):
    import bpp.runs as runs

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro" / ".bpp-run.json"))

    monkeypatch.setattr(runs, "atomic_write_json", read_only)
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", tmp_path / "ro", *FAST)
    _one_line_error(code, err, "read-only")


def test_report_of_a_list_is_one_line(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    (run / "report.json").write_text("[1, 2]")
    code, err = _cli("report", run, "--out", tmp_path / "cmp")
    _one_line_error(code, err, "report.json", "not a bpp report")


# --- 8. the smaller ones -----------------------------------------------------------------------------

def test_temporary_folders_of_a_killed_compaction_are_cleaned_on_resume(run_dir, tmp_path):
    cut = _interrupted_copy(run_dir, tmp_path)
    leftover = cut / ".model-abc123"
    leftover.mkdir()
    (leftover / PARTIAL_MARKER).write_text("")
    (leftover / "model.safetensors").write_bytes(b"0" * 1000)
    (cut / ".report.json.tmp").write_text("{")
    assert _cli("prune", "--resume", cut, "--quiet")[0] == 0
    assert not leftover.exists() and not (cut / ".report.json.tmp").exists()


def test_binary_data_is_refused(tiny_llama_dir, tmp_path):
    blob = tmp_path / "blob.txt"
    blob.write_bytes(bytes(range(256)) * 100)
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", tmp_path / "b", "--data", blob, *FAST)
    _one_line_error(code, err, "does not look like text")


def test_unknown_granularity_names_what_was_given(tiny_llama_dir, tmp_path):
    code, err = _cli("prune", "--model", tiny_llama_dir, "--out", tmp_path / "g", "--granularity", "bogus", *FAST)
    _one_line_error(code, err, "unknown granularity bogus;")


def test_run_folder_manifest_lists_what_bpp_wrote(run_dir):
    manifest = json.loads((run_dir / MANIFEST).read_text())
    assert manifest["job"] == "prune"
    written = {p.name for p in run_dir.iterdir()} - {MANIFEST}
    assert written <= set(manifest["files"]), written - set(manifest["files"])


def test_run_folder_check_has_no_side_effects(tmp_path):
    folder = RunFolder(tmp_path / "new", "prune")
    folder.check()
    assert not (tmp_path / "new").exists()
