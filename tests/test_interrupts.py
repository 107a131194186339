"""No stale temporaries: SIGTERM during a save is handled like Ctrl-C, the temporary a SIGKILL
leaves is removed by the next write to the same target (and nothing else is), and a signal
after the final rename reports the file as saved. Real subprocesses and real signals, made
deterministic by ``interrupt_helper.py`` (the write waits for the signal)."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_export_cli import run

import dynconvert
from dynconvert.io import atomic_output, atomic_write_text

HELPER = Path(__file__).with_name("interrupt_helper.py")
CONVERT = ["test_resnet", "--no-pretrained", "--k", "2", "--input-size", "3,32,32"]


def _default_sigint() -> None:
    """A shell runs background jobs with SIGINT ignored, and children inherit that (Python then
    installs no Ctrl-C handler): give the child the SIGINT of a terminal's foreground job."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(mode: str, folder: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(HELPER), mode, *args],
        cwd=folder,
        env=env,
        preexec_fn=_default_sigint,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_while_writing(proc: subprocess.Popen, sig: int) -> tuple[Path, str]:
    """Wait until the save has written part of its temporary, send ``sig``; (temporary,
    stderr)."""
    try:
        for line in proc.stdout:
            if line.startswith("WRITING "):
                tmp = Path(line.split(" ", 1)[1].strip())
                assert tmp.exists()
                proc.send_signal(sig)
                break
        else:
            pytest.fail(f"the save never started: {proc.stderr.read()}")
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return tmp, err


def temporaries(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.glob(f".{name}.*"))


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_a_save_removes_the_temporary_and_keeps_the_old_file(tmp_path, sig, code):
    (tmp_path / "m.pt").write_bytes(b"the old model")
    proc = start("slow-save", tmp_path, *CONVERT, "--out", "m.pt")
    tmp, err = signal_while_writing(proc, sig)
    assert proc.returncode == code, err
    lines = err.strip().splitlines()
    assert lines[-1] == f"error: interrupted by {signal.Signals(sig).name}", err
    assert "Traceback" not in err
    assert not tmp.exists() and temporaries(tmp_path, "m.pt") == []
    assert (tmp_path / "m.pt").read_bytes() == b"the old model"


def test_the_temporary_a_sigkill_leaves_is_removed_by_the_next_save_only(
    tmp_path, capsys, monkeypatch
):
    proc = start("slow-save", tmp_path, *CONVERT, "--out", "m.pt")
    stale, _ = signal_while_writing(proc, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert stale.exists()  # what a SIGKILL leaves: nothing can run in the killed process
    unrelated = [
        ".m.pt.backup.tmp",  # not mkstemp's 8 characters
        ".m.pt.abcdefgh.tmp.keep",
        ".m.pt.abcdefgh.png",  # another suffix
        ".m.pt2.abcdefgh.tmp",  # another target's temporary
        ".xm.pt.abcdefgh.tmp",
        "m.pt.abcdefgh.tmp",
    ]
    for name in unrelated:
        (tmp_path / name).write_text("keep")
    (tmp_path / "target").write_text("keep")
    (tmp_path / ".m.pt.linkxxxx.tmp").symlink_to(tmp_path / "target")  # a link: not ours
    live = tmp_path / ".m.pt.livexxxx.tmp"  # a temporary another writer still holds
    with open(live, "wb") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.chdir(tmp_path)
        code, _, err = run(capsys, *CONVERT, "--out", "m.pt")
    assert code == 0, err
    assert not stale.exists()
    dynconvert.load(tmp_path / "m.pt")
    left = sorted(p.name for p in tmp_path.iterdir())
    expected = [*unrelated, ".m.pt.linkxxxx.tmp", ".m.pt.livexxxx.tmp", "m.pt", "target"]
    assert left == sorted(expected)
    assert (tmp_path / "target").read_text() == "keep"


def test_each_writer_removes_only_its_own_targets_stale_temporaries(tmp_path):
    """The exported and plotted files keep their suffix on the temporary: the same rule."""
    stale = [tmp_path / ".curves.png.k2j4_9zq.png", tmp_path / ".r.json.0123abcd.tmp"]
    other = [tmp_path / ".curves.png.k2j4_9zq.tmp", tmp_path / ".r.json.0123abcd.png"]
    for path in (*stale, *other):
        path.write_text("x")
    with atomic_output(tmp_path / "curves.png", suffix=".png") as tmp:
        tmp.write_bytes(b"png")
    atomic_write_text("{}", tmp_path / "r.json")
    assert [p.exists() for p in stale] == [False, False]
    assert [p.exists() for p in other] == [True, True]


@pytest.mark.parametrize("with_json", [False, True])
def test_a_sigterm_after_the_final_rename_reports_the_file_as_saved(tmp_path, with_json):
    """The helper sends SIGTERM right after each rename: after the model's (the last write)
    the run says it saved the model, exit 0; after the report's (--json is written first) the
    model is still missing, and that is an interrupted run that names what was saved."""
    extra = ["--json", "r.json"] if with_json else []
    proc = start("term-after-rename", tmp_path, *CONVERT, "--out", "m.pt", *extra)
    _, err = proc.communicate(timeout=120)
    if not with_json:
        assert proc.returncode == 0, err
        assert err.strip().splitlines()[-1].startswith("saved m.pt (complete"), err
        assert "error" not in err
        dynconvert.load(tmp_path / "m.pt")
    else:
        assert proc.returncode == 143, err
        assert err.strip().splitlines()[-1] == (
            "error: interrupted by SIGTERM; r.json saved and complete"
        ), err
        assert not (tmp_path / "m.pt").exists()
    assert [p.name for p in tmp_path.glob(".*")] == []
