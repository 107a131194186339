"""`dynconvert export FILE`: a written, verified file; bad input is one line and an exit code."""

from __future__ import annotations

import sys

import pytest
import timm
import torch

import dynconvert
from dynconvert import DynconvertError
from dynconvert.cli import main

SIZE = "3,32,32"


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """timm's tiny test_resnet, converted and saved by dynconvert."""
    model = timm.create_model("test_resnet", pretrained=False)
    model, report = dynconvert.convert(model, k=2, input_size=(3, 32, 32))
    path = tmp_path_factory.mktemp("cli") / "m.pt"
    dynconvert.save(model, path, report=report)
    return path


def run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(err: str, *fragments: str) -> str:
    errors = [line for line in err.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in errors[0], err
    return errors[0]


def test_export_writes_a_verified_file(saved, tmp_path, capsys):
    out = tmp_path / "m.pt2"  # the format comes from the suffix
    code, stdout, err = run(capsys, "export", saved, "--out", out, "--input-size", SIZE,
                            "--fold-bn")  # fmt: skip
    assert code == 0, err
    assert "wrote" in stdout and "verified at batch sizes 1, 3, 8" in stdout
    assert "folded" in stdout and "relative" in stdout  # the verification table was printed
    x = torch.randn(4, 3, 32, 32)
    model = dynconvert.load(saved).eval()
    with torch.no_grad():
        expected = model(x)
        got = torch.export.load(out).module()(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt2"]


def test_unsupported_format(saved, tmp_path, capsys):
    code, _, err = run(capsys, "export", saved, "--format", "tflite", "--out", tmp_path / "m.x")
    assert code == 2
    assert_one_line_error(err, "tflite")


def test_format_needed_for_an_unknown_suffix(saved, tmp_path, capsys):
    code, _, err = run(capsys, "export", saved, "--out", tmp_path / "m.bin")
    assert code == 2
    assert_one_line_error(err, "--format")


def test_not_a_dynconvert_file(tmp_path, capsys):
    plain = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    code, _, err = run(capsys, "export", plain, "--format", "pt2", "--out", tmp_path / "o.pt2")
    assert code == 1
    assert_one_line_error(err, "not a dynconvert file")
    assert not (tmp_path / "o.pt2").exists()


@pytest.mark.parametrize(
    ("size", "fragment"), [("4,32,32", "cannot take inputs of size (4, 32, 32)"), ("abc", "abc")]
)
def test_input_size_the_model_cannot_take(saved, tmp_path, capsys, size, fragment):
    out = tmp_path / "m.pt2"
    code, _, err = run(capsys, "export", saved, "--out", out, "--input-size", size)
    assert code == 2
    assert_one_line_error(err, fragment)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("missing", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_optional_dependency(saved, tmp_path, capsys, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ImportError
    code, _, err = run(capsys, "export", saved, "--out", tmp_path / "m.onnx", "--input-size", SIZE)
    assert code == 1
    assert_one_line_error(err, missing, "pip install 'dynconvert[export]'")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_only_matters_for_verification(tmp_path, monkeypatch):
    from dynconvert.export.deps import check_available

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    check_available("onnx", verify=False)
    check_available("pt2", verify=True)
    with pytest.raises(DynconvertError, match="onnxruntime"):
        check_available("onnx", verify=True)


def test_api_rejects_unknown_format(tmp_path):
    with pytest.raises(DynconvertError, match="choose one of pt2, onnx, torchscript"):
        dynconvert.export(torch.nn.Identity(), tmp_path / "m.x", "tflite")
