"""Inputs that were read wrongly or accepted silently (issue 24): each is now one line with the
right exit code (2 bad usage, 1 failure) from the CLI, or a clear DynconvertError in Python,
and nothing is written."""

from __future__ import annotations

import sys
import textwrap
import warnings

import pytest
import timm
import torch
from finetune_helpers import QUIET, make_data_dir, make_image_folder, tiny_model
from test_export_cli import assert_one_line_error, run
from torch import nn

import dynconvert
from dynconvert import DynconvertError
from dynconvert.cli.params import parse_input_size, square_image_size

FORMS = "N (one positive int"  # the start of the accepted forms in every --input-size error
BUILDERS = """
import sys

import torch
from torch import nn

import dynconvert


def net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


def exits_0():
    sys.exit(0)


def exits_3():
    raise SystemExit(3)


def interrupted():
    raise KeyboardInterrupt


def on_meta():
    with torch.device("meta"):
        return net()


def scripted():
    return torch.jit.script(net())


def converted():
    return dynconvert.convert(net(), skip_stem=False)[0]
"""


@pytest.fixture(autouse=True)
def _wide_console(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def builders(tmp_path, monkeypatch) -> str:
    """The module ``badbuilders`` with model builders that fail in each way."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "badbuilders.py").write_text(textwrap.dedent(BUILDERS))
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "badbuilders", raising=False)
    return "badbuilders"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model, report = dynconvert.convert(
        timm.create_model("test_resnet"), k=2, input_size=(3, 32, 32)
    )
    path = tmp_path_factory.mktemp("saved") / "m.pt"
    dynconvert.save(model, path, report=report)
    return path


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))


# -- --input-size: N or C,H,W, nothing dropped, the same in every command ---------------------


@pytest.mark.parametrize(
    ("text", "size"), [("224", (224,)), ("3,32,48", (3, 32, 48)), (" 1, 28 ,28 ", (1, 28, 28))]
)
def test_input_size_accepts_one_int_or_three(text, size):
    assert parse_input_size(text) == size


@pytest.mark.parametrize(
    "text", ["3,x,32", "3,,32", "32,32", "1,3,32,32", "0", "-3", "3,0,32", "", "3x32x32", "1e3"]
)
def test_input_size_refuses_everything_else_with_the_forms(text):
    with pytest.raises(ValueError, match=r"N \(one positive int.* or C,H,W") as info:
        parse_input_size(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    "command",
    [
        ["test_resnet", "--no-pretrained", "--dry-run"],
        ["inspect", "test_resnet"],
        ["export", "m.pt", "--out", "m.onnx"],
        ["bench", "test_resnet"],
        ["finetune", "m.pt", "--data", "data", "--out", "f.pt"],
    ],
)
@pytest.mark.parametrize("size", ["3,x,32", "32,32"])
def test_every_command_refuses_a_bad_input_size(tmp_path, monkeypatch, capsys, command, size):
    """``3,x,32`` was read as 3×3×32 (empty tokens dropped); H,W is no longer a form."""
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run(capsys, *command, "--input-size", size)
    assert code == 2
    assert_one_line_error(err, "--input-size", FORMS, "C,H,W", repr(size))
    assert stdout == "" and list(tmp_path.iterdir()) == []


def test_fine_tuning_sizes_are_square_rgb():
    assert square_image_size((16,)) == 16 and square_image_size((3, 16, 16)) == 16
    for size in [(3, 16, 24), (1, 16, 16)]:
        with pytest.raises(DynconvertError, match="RGB images at a square size; give N or 3,N,N"):
            square_image_size(size)


def test_finetune_refuses_a_non_square_input_size(tmp_path, saved, capsys):
    data = make_data_dir(tmp_path / "data", per_class=2)
    out = tmp_path / "ft.pt"
    code, _, err = run(capsys, "finetune", saved, "--data", data, "--out", out,
                       "--input-size", "3,16,24")  # fmt: skip
    assert code == 2
    assert_one_line_error(err, "--input-size 3,16,24", "square size")
    assert not out.exists()


# -- empty class folders ----------------------------------------------------------------------


def test_empty_class_folder_is_refused_by_name(tmp_path, saved, capsys):
    data = make_data_dir(tmp_path / "data", per_class=2)
    (data / "train" / "zebra").mkdir()
    (data / "train" / "zebra" / "notes.txt").write_text("no images here")
    out = tmp_path / "ft.pt"
    code, _, err = run(capsys, "finetune", saved, "--data", data, "--out", out, "--epochs", "1")
    assert code == 2
    assert_one_line_error(err, f"class folder {data / 'train' / 'zebra'} has no images",
                          "--allow-empty-classes")  # fmt: skip
    assert not out.exists() and not out.with_suffix(".ckpt").exists()


def test_empty_class_folder_is_refused_in_python_unless_allowed(tmp_path):
    root = make_image_folder(tmp_path / "train", classes=("a", "b"), per_class=4)
    (root / "c").mkdir()
    with pytest.raises(DynconvertError, match=r"class folder .*train/c has no images"):
        dynconvert.finetune(tiny_model(), root, epochs=1, batch_size=4, input_size=16, **QUIET)
    result = dynconvert.finetune(tiny_model(), root, epochs=1, batch_size=4, input_size=16,
                                 allow_empty_classes=True, **QUIET)  # fmt: skip
    assert result.classes == ["a", "b", "c"] and len(result.history) == 1


def test_allow_empty_classes_is_a_recipe_key_and_a_bool():
    from dynconvert.finetune import FinetuneOptions
    from dynconvert.recipes import DATA_SCHEMA

    assert DATA_SCHEMA["allow_empty_classes"] == (bool,)
    with pytest.raises(DynconvertError, match="allow_empty_classes: expected true or false"):
        FinetuneOptions(allow_empty_classes="yes")


# -- model builders ---------------------------------------------------------------------------


@pytest.mark.parametrize(("builder", "shown"), [("exits_0", "SystemExit(0)"),
                                                ("exits_3", "SystemExit(3)")])  # fmt: skip
def test_builder_that_exits_is_a_failure_naming_it(tmp_path, builders, capsys, builder, shown):
    out = tmp_path / "m.pt"
    code, _, err = run(capsys, f"{builders}:{builder}", "--out", out)
    assert code == 1
    assert_one_line_error(err, f"{builders}:{builder}() raised {shown}")
    assert not out.exists()


def test_builder_that_exits_as_the_architecture_of_a_file(tmp_path, builders, saved, capsys):
    out = tmp_path / "m.onnx"
    code, _, err = run(capsys, "export", saved, "--model", f"{builders}:exits_0", "--out", out)
    assert code == 1
    assert_one_line_error(err, f"{builders}:exits_0() raised SystemExit(0)")
    assert not out.exists()


def test_ctrl_c_in_a_builder_still_interrupts(tmp_path, builders, capsys):
    code, _, err = run(capsys, f"{builders}:interrupted", "--out", tmp_path / "m.pt")
    assert code == 130
    assert_one_line_error(err, "interrupted")


# -- MODEL that names nothing, --device --------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [["", "--dry-run"], [" ", "--dry-run"], [":", "--dry-run"], ["hf-hub:", "--dry-run"],
     ["inspect", ""], ["inspect", ":"], ["bench", ":"]],
)  # fmt: skip
def test_model_that_names_nothing_is_bad_usage(tmp_path, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)  # '' was read as the current folder
    code, _, err = run(capsys, *args)
    assert code == 2
    line = assert_one_line_error(
        err, "names no model", "timm model name", "package.module:function"
    )
    assert "folder" not in line and "Hub" not in line


@pytest.mark.parametrize(
    ("device", "named"),
    [("bogus", "'bogus' is not a device"), ("meta", "cpu or cuda, not 'meta'"), ("", "''")],
)
def test_finetune_bad_device_is_bad_usage(tmp_path, saved, capsys, device, named):
    data = make_data_dir(tmp_path / "data", per_class=2)
    out = tmp_path / "ft.pt"
    code, _, err = run(capsys, "finetune", saved, "--data", data, "--out", out, "--device", device)
    assert code == 2
    assert_one_line_error(err, "device", named)
    assert not out.exists()


@pytest.mark.parametrize(
    "empty", ["MODEL", "--out", "--data", "--recipe", "--resume", "--plot", "--checkpoint"]
)
def test_empty_path_is_not_the_current_folder(tmp_path, monkeypatch, saved, capsys, empty):
    """``Path("")`` is ``.``: the current folder was read as the data or the model."""
    monkeypatch.chdir(tmp_path)
    make_data_dir(tmp_path / "data", per_class=2)
    model = "" if empty == "MODEL" else str(saved)
    paths = {"--out": "ft.pt", "--data": "data", empty: ""}
    options = [part for flag, path in paths.items() if flag != "MODEL" for part in (flag, path)]
    code, _, err = run(capsys, "finetune", model, *options)
    assert code == 2
    assert_one_line_error(err, "is empty; give a path")
    assert not (tmp_path / "ft.pt").exists()


# -- models that cannot be converted, saved or loaded -----------------------------------------


def test_converting_again_says_already_dynamic():
    model, _ = dynconvert.convert(_net(), input_size=(3, 8, 8))
    with pytest.raises(DynconvertError, match="the model is already dynamic") as info:
        dynconvert.convert(model)
    assert "skip_stem" not in str(info.value).split("skipped:")[0]
    assert "--no-skip-stem" not in str(info.value) and "original static model" in str(info.value)


def test_converting_a_converted_model_from_the_cli(tmp_path, builders, capsys):
    out = tmp_path / "m.pt"
    code, _, err = run(capsys, f"{builders}:converted", "--out", out)
    assert code == 2
    line = assert_one_line_error(err, "already dynamic", "original static model")
    assert "no-skip-stem" not in line and not out.exists()


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_is_refused_with_the_way_forward(how):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated in newer torch
        if how == "script":
            compiled = torch.jit.script(_net())
        else:
            compiled = torch.jit.trace(_net(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(DynconvertError, match=r"TorchScript module .* cannot be converted; pass "
                       r"the eager nn.Module"):  # fmt: skip
        dynconvert.convert(compiled)


def test_torchscript_builder_is_refused_by_the_cli(tmp_path, builders, capsys):
    out = tmp_path / "m.pt"
    code, _, err = run(capsys, f"{builders}:scripted", "--out", out)
    assert code == 1
    assert_one_line_error(err, f"{builders}:scripted() returned a TorchScript module", "eager")
    assert not out.exists()


def test_meta_models_are_refused_by_save_and_load(tmp_path, saved):
    model, _ = dynconvert.convert(_net(), input_size=(3, 8, 8))
    model.to("meta")
    path = tmp_path / "m.pt"
    with pytest.raises(DynconvertError, match="on the meta device, which holds no data"):
        dynconvert.save(model, path)
    assert list(tmp_path.iterdir()) == []
    with torch.device("meta"):
        skeleton = timm.create_model("test_resnet")
    with pytest.raises(DynconvertError, match=r"passed as model= is on the meta device"):
        dynconvert.load(saved, model=skeleton)
    with pytest.raises(DynconvertError, match="map_location='meta' would load no weights"):
        dynconvert.load(saved, map_location="meta")


def test_meta_builder_is_refused_by_the_cli(tmp_path, builders, capsys):
    out = tmp_path / "m.pt"
    code, _, err = run(capsys, f"{builders}:on_meta", "--out", out)
    assert code == 1
    assert_one_line_error(err, f"{builders}:on_meta() built the model on the meta device")
    assert not out.exists()


# -- export: a suffix that names another format -----------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "out", "named"),
    [("torchscript", "m.onnx", "onnx"), ("onnx", "m.pt2", "pt2"), ("pt2", "m.ts", "torchscript")],
)
def test_export_format_that_contradicts_the_suffix(tmp_path, saved, capsys, fmt, out, named):
    code, _, err = run(capsys, "export", saved, "--format", fmt, "--out", tmp_path / out)
    assert code == 2
    assert_one_line_error(err, f"--format {fmt} does not match --out {out}", f"names {named}")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--out", "--plot", "--checkpoint"])
def test_finetune_output_that_is_a_folder_is_bad_usage(tmp_path, saved, capsys, option):
    data = make_data_dir(tmp_path / "data", per_class=2)
    folder = tmp_path / "somewhere"
    folder.mkdir()
    paths = {"--out": tmp_path / "ft.pt", option: folder}
    options = [str(part) for flag, path in paths.items() for part in (flag, path)]
    code, _, err = run(capsys, "finetune", saved, "--data", data, *options)
    assert code == 2
    assert_one_line_error(err, option, "is a directory")
    assert list(folder.iterdir()) == [] and not (tmp_path / "ft.pt").exists()
