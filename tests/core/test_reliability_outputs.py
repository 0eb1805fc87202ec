"""Safe outputs (lte/core/outputs.py): --out checked before any work, --overwrite only of what lte wrote,
staged writes, stale temporaries, umask, the run lock, a full disk."""

import errno
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, STORIES
from lte.cli import main, run_cli
from lte.core.errors import UsageError
from lte.core.outputs import MARKER, check_out, clean_stale, disk_guard, run_lock, staged_dir


def tree_hash(root) -> str:
    """Every path, file content and directory under ``root``: equal hashes mean an untouched tree."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def fails(capsys, argv, *needles):
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


def test_export_out_equal_to_inside_or_above_the_run_is_refused_and_the_run_is_untouched(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    before = tree_hash(run.parent)
    export = ["export", run, "--target-sparsity", "0.5", "--calibration-tokens", "4096", "--out"]
    for out, says in (
        (run, "is the run"),
        (run / "stage2", "part of the run"),
        (run / "stage2" / "model" / "x", "part of the run"),
        (run / "stage1", "part of the run"),
        (run.parent, "contains the run"),
    ):
        for flags in ([], ["--overwrite"]):
            fails(capsys, [*export, out, *flags], says)
    assert tree_hash(run.parent) == before
    # an input of the run (its held-out data) is refused too
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(REPO / "assets" / "tinystories" / "eval.txt", data / "eval.txt")
    fails(
        capsys,
        ["analyze", "wasserstein", STORIES, "--data", data / "eval.txt", "--out", data, "--overwrite"],
        "contains --data",
    )
    fails(
        capsys,
        ["analyze", "wasserstein", STORIES, "--data", data / "eval.txt", "--out", STORIES / "w"],
        "lies inside the model",
    )
    fails(
        capsys,
        ["compare", "--model", STORIES, "--data", data / "eval.txt", "--out", STORIES, "--overwrite"],
        "is --model",
    )
    fails(
        capsys,
        ["compare", "--model", STORIES, "--data", data / "eval.txt", "--lte", run, "--out", run / "stage2"],
        "part of the --lte run",
    )
    assert tree_hash(run.parent) == before


def test_overwrite_replaces_only_a_directory_lte_wrote(tiny_run, tmp_path, capsys):
    run, _ = tiny_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    export = ["export", run, "--target-sparsity", "0.5", "--out"]
    fails(capsys, [*export, mine], "already exists", "--overwrite")
    fails(capsys, [*export, mine, "--overwrite"], f"not written by `lte export` (it has no {MARKER})")
    (mine / MARKER).write_text(json.dumps({"command": "compare"}))  # another command's output is not export's either
    fails(capsys, [*export, mine, "--overwrite"], "not written by `lte export`")
    assert sorted(p.name for p in mine.iterdir()) == [MARKER, "notes.txt"]
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    fails(capsys, [*export, a_file, "--overwrite"], "is an existing file")
    fails(capsys, [*export, a_file / "sub"], "is a file, so no directory can be made under it")
    assert a_file.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "mine"]


def test_staged_dir_swaps_whole_directories_and_touches_nothing_else(tmp_path):
    out = tmp_path / "results"
    user_old = tmp_path / "results.old"  # a directory of the user's with the name a naive backup would use
    user_old.mkdir()
    (user_old / "keep.txt").write_text("keep")
    with staged_dir(out, "compare") as tmp:
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1" and json.loads((out / MARKER).read_text())["command"] == "compare"
    check_out(out, "compare", overwrite=True)  # its own earlier output may be replaced
    with pytest.raises(UsageError, match="already exists"):
        check_out(out, "compare")
    with staged_dir(out, "compare", overwrite=True) as tmp:
        (tmp / "b.txt").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]
    # two statements under pytest.raises (PT012): staged_dir wraps the whole body, which raises only at its end
    with pytest.raises(RuntimeError, match="boom"), staged_dir(out, "compare", overwrite=True) as tmp:  # noqa: PT012
        (tmp / "c.txt").write_text("3")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "b.txt"]  # a failure leaves the old output
    with pytest.raises(UsageError, match="appeared or changed"), staged_dir(tmp_path / "late", "compare") as tmp:  # noqa: PT012
        (tmp_path / "late").mkdir()
        (tmp_path / "late" / "theirs.txt").write_text("theirs")  # appears while the command works
    assert (tmp_path / "late" / "theirs.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["late", "results", "results.old"]
    assert (user_old / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_directories_follow_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        with staged_dir(tmp_path / "out", "compare") as tmp:
            (tmp / "sub").mkdir()
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_stale_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    dead = dead_pid()
    stale = tmp_path / f".out.lte-tmp-{dead}-abc123"
    live = tmp_path / f".out.lte-tmp-{os.getpid()}-abc123"
    moved_aside = tmp_path / f".prev.lte-old-{dead}-abc123"  # a swap killed after moving the old output aside
    user = tmp_path / ".out.tmp-123"  # not a name lte makes
    for d in (stale, live, moved_aside, user):
        d.mkdir()
        (d / "f").write_text("x")
    clean_stale(tmp_path)
    assert not stale.exists() and live.is_dir() and user.is_dir()
    assert (tmp_path / "prev" / "f").read_text() == "x" and not moved_aside.exists()  # put back


def test_a_second_process_cannot_take_the_lock_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            (
                "import sys, time; from pathlib import Path; "
                "from lte.core.outputs import run_lock\nwith run_lock(Path(sys.argv[1])):\n"
                "    print('held', flush=True); time.sleep(120)"
            ),
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with (
            pytest.raises(UsageError, match=f"another process \\(PID {holder.pid}\\) is training into"),
            run_lock(tmp_path),
        ):
            pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with run_lock(tmp_path):  # the dead process's lock is taken over
        assert (tmp_path / ".lte-lock").read_text().strip() == str(os.getpid())


class FullDisk(io.RawIOBase):
    """A file on a full disk: every write fails with ENOSPC."""

    name = "/mnt/full/optimizer.pt"

    def writable(self):
        return True

    def write(self, data):
        raise OSError(errno.ENOSPC, "No space left on device", self.name)


def test_a_full_disk_is_one_message_naming_the_path(tmp_path, capsys, monkeypatch):
    import lte.core.outputs

    with (
        pytest.raises(UsageError, match=r"no space left on device at /mnt/full/optimizer\.pt; free some space"),
        disk_guard(tmp_path),
    ):
        torch.save({"w": torch.zeros(4096)}, FullDisk())
    # torch writing to a path reports the failure from C++ without an errno; the free space decides
    torch_error = RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
    )
    with pytest.raises(RuntimeError, match="file write failed"), disk_guard(tmp_path):
        raise torch_error  # space is left here: not called a full disk
    monkeypatch.setattr(lte.core.outputs.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))
    with pytest.raises(UsageError, match=f"no space left on device at {tmp_path}"), disk_guard(tmp_path):
        raise torch_error
    with pytest.raises(ZeroDivisionError), disk_guard(tmp_path):  # anything else passes through
        raise ZeroDivisionError

    def full():
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "stage1" / "optimizer.pt"))

    assert run_cli(full) == 2
    assert (
        capsys.readouterr().err == f"error: no space left on device at {tmp_path / 'stage1' / 'optimizer.pt'}; "
        "free some space, then rerun the same command\n"
    )


def test_every_source_of_a_comma_separated_data_key_is_an_input_and_is_made_absolute(tmp_path, monkeypatch):
    """data.eval and export.calibration take several sources, as data.train does: each one is guarded
    from the run's output_dir and recorded as an absolute path (not the whole list as one path)."""
    from lte.core.record import resolve_paths
    from lte.pipeline import preflight_outputs
    from lte.training.config import load_recipe

    (tmp_path / "held").mkdir()
    for name in ("a.txt", "held/b.txt", "c.txt"):
        (tmp_path / name).write_text("Once upon a time there was a cat.\n" * 20)
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(
        ["recipe=tiny", "output_dir=held", "data.eval=a.txt, held/b.txt", "export.calibration=c.txt,a.txt"],
        check_hardware=False,
    )
    resolved = resolve_paths(recipe)
    assert resolved.data.eval == f"{tmp_path / 'a.txt'},{tmp_path / 'held' / 'b.txt'}"
    assert resolved.export.calibration == f"{tmp_path / 'c.txt'},{tmp_path / 'a.txt'}"
    with pytest.raises(UsageError, match=r"output_dir=held contains data\.eval \(held/b\.txt\)"):
        preflight_outputs(recipe)
    from lte.export.exporter import ExportRequest

    request = ExportRequest(run_dir=str(tmp_path / "no-run"), out="x", target_sparsity=0.5, calibration="c.txt, a.txt")
    assert request.settings()["calibration"] == resolved.export.calibration
    with pytest.raises(UsageError) as refused:  # the calibration list passes; the missing run is what stops it
        request.validate()
    assert "not found" not in str(refused.value) and "no-run" in str(refused.value)
