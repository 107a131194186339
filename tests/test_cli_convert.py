"""`dynconvert MODEL ...` and `dynconvert inspect ...`: outputs, exit codes, one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import dynconvert
from dynconvert.cli import main
from dynconvert.io import read

TIMM_NAME = "test_resnet"  # timm's tiny test model: converts in about a second


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # rich folds long names in narrow tables


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.lower().startswith("error")]
    assert len(errors) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in errors[0], err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`dynconvert test_resnet --k 2 --no-pretrained --out m.pt --json r.json`."""
    folder = tmp_path_factory.mktemp("cli")
    out, report = folder / "m.pt", folder / "r.json"
    code = main(
        [TIMM_NAME, "--k", "2", "--no-pretrained", "--out", str(out), "--json", str(report)]
    )
    assert code == 0
    return out, report


def test_convert_writes_model_and_json(saved, capsys):
    out, report_json = saved
    data = read(out)
    assert data["source"] == {"kind": "timm", "name": TIMM_NAME, "kwargs": {}}
    assert data["config"]["k"] == 2 and not data["config_inferred"]
    report = json.loads(report_json.read_text())
    assert report["rows"] == data["report"]["rows"]
    converted = [r["name"] for r in report["rows"] if r["status"] == "converted"]
    assert converted == data["converted"] and converted
    model = dynconvert.load(out)
    layers = [n for n, m in model.named_modules() if isinstance(m, dynconvert.DynamicConvNd)]
    assert layers == converted


def test_readme_flow_resnet50(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "resnet50", "--k", "4", "--no-pretrained", "--out", "model.pt")
    assert code == 0, err
    assert "saved model.pt" in out and "layer4.2.conv3" in out
    code, out, err = run(capsys, "inspect", "model.pt")
    assert code == 0, err
    assert "timm resnet50; k=4" in out and "layer4.2.conv3" in out and "converted" in out
    data = read("model.pt")
    assert len(data["converted"]) == 52  # every conv but the stem
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    (tmp_path / "model.pt").unlink()  # 385 MiB; pytest keeps recent tmp folders


def test_saved_file_as_model_is_saved_again(saved, tmp_path, capsys):
    out, _ = saved
    code, stdout, err = run(capsys, out, "--out", tmp_path / "again.pt")
    assert code == 0, err
    assert "converted" in stdout
    first, again = read(out), read(tmp_path / "again.pt")
    assert first["converted"] == again["converted"] and first["config"] == again["config"]
    assert all(torch.equal(first["state_dict"][k], v) for k, v in again["state_dict"].items())

    code, _, err = run(capsys, out, "--k", "8", "--out", tmp_path / "x.pt")
    assert code == 2
    assert_one_line_error(err, "already converted", "--k")
    assert not (tmp_path / "x.pt").exists()


def test_dry_run_writes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, TIMM_NAME, "--no-pretrained", "--dry-run", "--out", "m.pt")
    assert code == 0, err
    assert "not written" in out and "converted" in out
    assert list(tmp_path.iterdir()) == []


def test_inspect_timm_name_converts_in_memory_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["inspect", TIMM_NAME, "--exclude", "layer1.*", "--input-size", "64", "--json", "r.json"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["input_size"] == [3, 64, 64]
    layer1 = [r for r in report["rows"] if r["name"].startswith("layer1.")]
    assert layer1 and all(r["status"] == "skipped" for r in layer1)
    assert any(r["status"] == "converted" for r in report["rows"])
    assert "layer1.0.conv1" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]


def test_checkpoint_weights_are_the_starting_point(tmp_path, capsys):
    reference = timm.create_model(TIMM_NAME)
    for p in reference.parameters():
        torch.nn.init.normal_(p)
    ckpt = tmp_path / "ckpt.pth"
    torch.save({"state_dict": reference.state_dict()}, ckpt)
    code, _, err = run(
        capsys, TIMM_NAME, "--checkpoint", ckpt, "--k", "2", "--out", tmp_path / "m.pt"
    )
    assert code == 0, err
    state = read(tmp_path / "m.pt")["state_dict"]
    expected = reference.state_dict()
    assert torch.equal(state["conv1.0.weight"], expected["conv1.0.weight"])  # the static stem
    mixed = state["layer1.0.conv1.weight"].mean(0)  # uniform attention: the mean of the K kernels
    assert torch.allclose(mixed, expected["layer1.0.conv1.weight"], atol=1e-6)


# -- bad input: one line, the right exit code ----------------------------------------------


@pytest.mark.parametrize("k", ["0", "-3", "abc", "1.5"])
def test_bad_k_is_a_usage_error(capsys, k):
    code, _, err = run(capsys, TIMM_NAME, "--k", k, "--dry-run")
    assert code == 2
    assert_one_line_error(err, "--k")


def test_missing_out_is_a_usage_error(capsys):
    code, _, err = run(capsys, TIMM_NAME, "--no-pretrained")
    assert code == 2
    assert_one_line_error(err, "--out", "--dry-run")


def test_unknown_name_suggests_close_matches(capsys):
    code, _, err = run(capsys, "resnt18", "--dry-run")
    assert code == 2
    assert_one_line_error(err, "unknown timm model 'resnt18'", "resnet18")


def test_debug_shows_the_traceback(capsys):
    code, _, err = run(capsys, "--debug", "resnt18", "--dry-run")
    assert code == 2 and "Traceback" in err


def test_pretrained_offline_says_what_to_do(capsys):
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # set by conftest before the hub is imported
    code, _, err = run(capsys, TIMM_NAME, "--dry-run")
    assert code == 1
    assert_one_line_error(err, "pretrained weights", "--no-pretrained", "--checkpoint")


@pytest.mark.parametrize("option", ["--include", "--exclude"])
def test_pattern_matching_nothing(capsys, option):
    code, _, err = run(capsys, TIMM_NAME, "--no-pretrained", option, "nothing.*", "--dry-run")
    assert code == 2
    assert_one_line_error(err, "'nothing.*'", "matches no")


def _bad_file(folder: Path, kind: str, good: Path) -> Path:
    path = folder / f"{kind}.pt"
    if kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 3])
    elif kind == "corrupt":
        path.write_bytes(os.urandom(2048))
    elif kind == "state-dict":
        torch.save(timm.create_model(TIMM_NAME).state_dict(), path)
    return path


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("truncated", "truncated or corrupt"),
        ("corrupt", "corrupt"),
        ("state-dict", "not a dynconvert file"),
    ],
)
@pytest.mark.parametrize("command", [[], ["inspect"]])
def test_bad_files(saved, tmp_path, capsys, kind, message, command):
    path = _bad_file(tmp_path, kind, saved[0])
    args = [*command, path] + ([] if command else ["--out", tmp_path / "out.pt"])
    code, _, err = run(capsys, *args)
    assert code == 1
    assert_one_line_error(err, message, str(path))
    assert not (tmp_path / "out.pt").exists()


def test_missing_file(tmp_path, capsys):
    code, _, err = run(capsys, "inspect", tmp_path / "nope.pt")
    assert code == 2
    assert_one_line_error(err, "does not exist")


def _evil_file(folder: Path, marker: Path) -> Path:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = folder / "evil.pt"
    torch.save({"format": "dynconvert", "version": 1, "state_dict": Evil()}, path)
    return path


def test_malicious_pickle_refused(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = _evil_file(tmp_path, marker)
    code, _, err = run(capsys, evil, "--out", tmp_path / "out.pt")
    assert code == 1
    assert_one_line_error(err, "refused", "nothing was executed")
    code, _, err = run(capsys, TIMM_NAME, "--checkpoint", evil, "--dry-run")
    assert code == 1
    assert_one_line_error(err, "refused", "posix.system", "nothing was executed")
    assert not marker.exists() and not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("content", [[1, 2], torch.zeros(3)], ids=["list", "tensor"])
def test_checkpoint_that_is_not_a_state_dict_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "w.pth"
    torch.save(content, path)
    code, _, err = run(capsys, TIMM_NAME, "--checkpoint", path, "--dry-run")
    assert code == 1
    assert_one_line_error(err, f"checkpoint {path} could not be read", "weights-only torch file")


def test_output_folder_missing_or_unwritable(tmp_path, capsys):
    regular = tmp_path / "file"
    regular.write_text("x")
    for out, message in [
        (tmp_path / "missing" / "m.pt", "does not exist"),
        (regular / "m.pt", "is not a folder"),
    ]:
        code, _, err = run(capsys, TIMM_NAME, "--no-pretrained", "--out", out)
        assert code == 1
        assert_one_line_error(err, f"cannot write {out}", message)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    readonly.chmod(0o555)
    try:
        code, _, err = run(capsys, TIMM_NAME, "--no-pretrained", "--out", readonly / "m.pt")
        if os.access(readonly, os.W_OK):  # root: the folder is writable after all
            assert code == 0, err
        else:
            assert code == 1
            assert_one_line_error(err, "not writable")
    finally:
        readonly.chmod(0o755)
    leftovers = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    assert leftovers in (["file", "ro"], ["file", "ro", "ro/m.pt"])


def test_real_process_errors(tmp_path):
    """`python -m dynconvert`: one line on stderr, the exit code, no traceback, nothing run."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    marker = tmp_path / "PWNED"
    evil = _evil_file(tmp_path, marker)
    for args, code, fragments in [
        (["resnt18", "--dry-run"], 2, ["unknown timm model", "did you mean"]),
        (["inspect", str(evil)], 1, ["refused", "nothing was executed"]),
    ]:
        result = subprocess.run(
            [sys.executable, "-m", "dynconvert", *args], capture_output=True, text=True, env=env
        )
        assert result.returncode == code, result.stderr
        assert_one_line_error(result.stderr, *fragments)
    assert not marker.exists()
