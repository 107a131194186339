"""Outputs never destroy inputs: every command and output flag refuses, before any model is
built, a path inside the data folder, a path that is an input file (also through a link or a
hard link), and two outputs on one file. One line, exit 2, nothing written."""

from __future__ import annotations

import os

import pytest
import timm
from finetune_helpers import make_data_dir
from test_export_cli import assert_one_line_error, run

import dynconvert
from dynconvert.cli import bench_cmd, convert_cmd, export_cmd, inspect_cmd
from dynconvert.model_request import finetune_run

TIMM_NAME = "test_resnet"


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    model = timm.create_model(TIMM_NAME, pretrained=False)
    model, report = dynconvert.convert(model, k=2, input_size=(3, 32, 32))
    path = tmp_path_factory.mktemp("model") / "m.pt"
    dynconvert.save(model, path, report=report)
    return path.read_bytes()


@pytest.fixture
def files(tmp_path, model_bytes, monkeypatch):
    """m.pt (a saved model), w.pth (weights), r.yaml (a recipe), s.ckpt (resume state),
    data/ (train/ and val/ images); building or loading any model fails the test."""
    (tmp_path / "m.pt").write_bytes(model_bytes)
    (tmp_path / "w.pth").write_bytes(b"weights")
    (tmp_path / "r.yaml").write_text("finetune:\n  epochs: 1\n")
    (tmp_path / "s.ckpt").write_bytes(b"state")
    make_data_dir(tmp_path / "data", per_class=2)

    def built(*args, **kwargs):
        raise AssertionError("a model was built before the outputs were checked")

    for module, name in [
        (convert_cmd, "prepare_model"),
        (inspect_cmd, "prepare_model"),
        (finetune_run, "load_model"),
        (export_cmd, "load_saved"),
        (bench_cmd, "_load_pair"),
    ]:
        monkeypatch.setattr(module, name, built)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def snapshot(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_refused(capsys, root, args, *fragments):
    before = snapshot(root)
    code, _, err = run(capsys, *args)
    assert code == 2, err
    assert_one_line_error(err, *fragments)
    assert snapshot(root) == before  # nothing written, nothing replaced


FINETUNE = ["finetune", "m.pt", "--data", "data", "--epochs", "1"]
NO_MODEL = ["finetune", "--data", "data", "--epochs", "1"]  # the recipe names the model
PIPELINE = [TIMM_NAME, "--no-pretrained", "--data", "data", "--epochs", "1"]


@pytest.mark.parametrize(
    "args",
    [
        [*FINETUNE, "--out", "data/train/a/000.png"],  # the overwritten image
        [*FINETUNE, "--out", "data/new.pt"],
        [*FINETUNE, "--out", "o.pt", "--checkpoint", "data/val/a/t.ckpt"],
        [*FINETUNE, "--out", "o.pt", "--plot", "data/train/curves.png"],
        [*FINETUNE, "--out", "data/o.pt"],
        [*PIPELINE, "--out", "data/train/b/000.png"],
        [*PIPELINE, "--out", "o.pt", "--json", "data/r.json"],
        [*PIPELINE, "--out", "o.pt", "--train-checkpoint", "data/t.ckpt"],
        [*PIPELINE, "--out", "o.pt", "--plot", "data/val/p.png"],
        [*FINETUNE[:2], "--recipe", "r2.yaml", "--out", "data/o.pt"],  # data.path of a recipe
    ],
    ids=[
        "finetune-out-image",
        "finetune-out",
        "finetune-checkpoint",
        "finetune-plot",
        "finetune-out-default-checkpoint",
        "convert-out-image",
        "convert-json",
        "convert-train-checkpoint",
        "convert-plot",
        "finetune-recipe-data",
    ],
)
def test_an_output_inside_the_data_folder_is_refused(files, args, capsys):
    (files / "r2.yaml").write_text("data:\n  path: data\nfinetune:\n  epochs: 1\n")
    assert_refused(capsys, files, args, "lies inside the --data folder data")


def test_an_output_in_a_linked_class_folder_or_through_a_link_is_refused(files, capsys):
    """The data holds links (a class folder kept elsewhere); an output reached through a link
    to the data is inside it too."""
    elsewhere = files / "elsewhere"
    (files / "data/train/c").rename(elsewhere)
    (files / "data/train/c").symlink_to(elsewhere, target_is_directory=True)
    (files / "to_data").symlink_to(files / "data", target_is_directory=True)
    for out in ("elsewhere/000.png", "elsewhere/new.pt", "to_data/train/a/x.pt"):
        assert_refused(capsys, files, [*FINETUNE, "--out", out], f"--out {out} lies inside")


@pytest.mark.parametrize(
    "args, named",
    [
        (["finetune", "--model", "x:y", "--weights", "w.pth", "--data", "data", "--out", "w.pth"],
         "(--weights)"),
        ([*FINETUNE, "--out", "o.pt", "--recipe", "r.yaml", "--plot", "r.yaml"], "(--recipe)"),
        ([*FINETUNE, "--out", "s.ckpt", "--checkpoint", "c.ckpt", "--resume", "s.ckpt"],
         "(--resume)"),
        ([*FINETUNE, "--out", "o.pt", "--resume", "s.ckpt", "--plot", "s.ckpt"], "(--resume)"),
        ([*NO_MODEL, "--recipe", "r3.yaml", "--out", "m.pt"], "(the recipe's model.name)"),
        ([*NO_MODEL, "--recipe", "r3.yaml", "--out", "o.pt", "--checkpoint", "w.pth"],
         "(the recipe's model.weights)"),
        (["m.pt", "--out", "o.pt", "--json", "link.pt"], "(MODEL)"),
        ([TIMM_NAME, "--checkpoint", "w.pth", "--out", "o.pt", "--json", "w.pth"],
         "(--checkpoint)"),
        ([*PIPELINE[:1], "--checkpoint", "w.pth", *PIPELINE[2:], "--out", "o.pt",
          "--train-checkpoint", "w.pth"], "(--checkpoint)"),
        ([*PIPELINE, "--recipe", "r.yaml", "--out", "o.pt", "--plot", "r.yaml"], "(--recipe)"),
        (["export", "m.pt", "--format", "onnx", "--out", "hard.pt"], "(MODEL_FILE)"),
        (["bench", "m.pt", "--json", "hard.pt"], "(MODEL)"),
        (["inspect", "m.pt", "--json", "link.pt"], "(MODEL)"),
    ],
    ids=[
        "finetune-out-weights",
        "finetune-plot-recipe",
        "finetune-out-resume",
        "finetune-plot-resume",
        "finetune-out-recipe-model",
        "finetune-checkpoint-recipe-weights",
        "convert-json-model-link",
        "convert-json-checkpoint",
        "convert-train-checkpoint-weights",
        "convert-plot-recipe",
        "export-out-hard-link",
        "bench-json-hard-link",
        "inspect-json-link",
    ],
)  # fmt: skip
def test_an_output_that_is_an_input_file_is_refused(files, args, named, capsys):
    (files / "link.pt").symlink_to(files / "m.pt")
    os.link(files / "m.pt", files / "hard.pt")
    (files / "r3.yaml").write_text("model:\n  name: m.pt\n  weights: w.pth\n")
    assert_refused(capsys, files, args, "it is the input file", named)


@pytest.mark.parametrize(
    "args, flags",
    [
        (["m.pt", "--out", "j.pt", "--json", "j.pt"], "--out and --json"),  # the case
        (["m.pt", "--out", "j.pt", "--json", "./sub/../j.pt"], "--out and --json"),
        ([*PIPELINE, "--out", "o.pt", "--json", "t.ckpt", "--train-checkpoint", "t.ckpt"],
         "--json and --train-checkpoint"),
        ([*PIPELINE, "--out", "o.pt", "--json", "o.ckpt"], "--json and the training checkpoint"),
        ([*PIPELINE, "--out", "o.pt", "--json", "p.png", "--plot", "p.png"], "--json and --plot"),
    ],
    ids=["convert-out-json", "convert-spelled-apart", "pipeline-json-checkpoint",
         "pipeline-json-default-checkpoint", "pipeline-json-plot"],
)  # fmt: skip
def test_two_outputs_on_one_file_are_refused(files, args, flags, capsys):
    (files / "sub").mkdir()
    assert_refused(capsys, files, args, f"{flags} are the same file")


def test_a_checkpoint_may_continue_the_state_it_resumes(files, capsys):
    """--resume OUT.ckpt rewrites that checkpoint: meant, so it passes the output checks."""
    (files / "o.ckpt").write_bytes(b"state")
    code, _, err = run(capsys, *FINETUNE, "--out", "o.pt", "--resume", "o.ckpt")
    assert code == 1 and "a model was built" in err  # past every check, to the loading
