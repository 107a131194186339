"""``dynconvert finetune``: bad models, weights, data and output paths, each refused before any
training with one line (and nothing written), or handled as documented."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from finetune_helpers import make_data_dir, make_image_folder, write_tinynet
from test_finetune_cli import FAST, error_line, run
from torch import nn

import dynconvert
from dynconvert import DynconvertError
from dynconvert.finetune import FinetuneOptions
from dynconvert.finetune.data import image_folder

MODULES = {
    "plainnet": """
import torch
from torch import nn

X = 5

def net(num_classes=3):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes),
    )

def needs_args(width):
    return net()

def not_a_model():
    return 3
""",
    "badimport": 'raise ValueError("boom at import")\n',
    "needsdep": "import surely_not_installed_dependency_xyz\n",
}


def finetune_tiny(capsys, data, *args):
    """``dynconvert finetune --model tinynet:tiny --data DATA ARGS`` with the fast settings."""
    return run(capsys, "finetune", "--model", "tinynet:tiny", "--data", data, *args, *FAST)


@pytest.fixture
def code(tmp_path, monkeypatch) -> Path:
    """Importable modules: ``tinynet`` (dynamic), ``plainnet`` (static) and broken ones."""
    folder = tmp_path / "code"
    folder.mkdir()
    write_tinynet(folder)
    for name, text in MODULES.items():
        (folder / f"{name}.py").write_text(text)
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(folder))
    return folder


@pytest.fixture
def data(tmp_path) -> Path:
    return make_data_dir(tmp_path / "data", per_class=4)


@pytest.fixture
def out_dir(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def one_line_error(err: str) -> str:
    """The error line, and nothing else on stderr (no traceback, no multi-line message)."""
    assert len(err.strip().splitlines()) == 1, err
    return error_line(err)


def test_plain_model_is_refused_before_training_and_converted_with_a_recipe(
    tmp_path, capsys, code, data, out_dir
):
    args = ["finetune", "--model", "plainnet:net", "--data", data, *FAST]
    status, err = run(capsys, *args, "--out", out_dir / "ft.pt")
    assert status == 2
    line = one_line_error(err)
    assert "plainnet:net has no dynamic convolutions" in line and "convert:" in line
    assert list(out_dir.iterdir()) == []  # no checkpoint: nothing was trained
    recipe = tmp_path / "r.yaml"
    recipe.write_text("convert:\n  k: 2\n")
    status, err = run(capsys, *args, "--recipe", recipe, "--out", out_dir / "ft.pt")
    assert status == 0, err
    import plainnet

    reloaded = dynconvert.load(out_dir / "ft.pt", model=plainnet.net())
    assert any(isinstance(m, dynconvert.DynamicConvNd) for m in reloaded.modules())


@pytest.mark.parametrize(("name", "message"), [("curves", "no suffix"), ("c.txt", "suffix .txt")])
def test_plot_format_is_checked_before_training(capsys, code, data, out_dir, name, message):
    status, err = finetune_tiny(capsys, data, "--out", out_dir / "ft.pt", "--plot", out_dir / name)
    assert status == 2
    line = one_line_error(err)
    assert message in line and ".png" in line and ".pdf" in line
    assert list(out_dir.iterdir()) == []
    # the convert → fine-tune pipeline checks it before building the model
    status, err = run(
        capsys,
        "test_resnet",
        "--no-pretrained",
        "--data",
        data,
        "--plot",
        out_dir / name,
        "--out",
        out_dir / "m.pt",
    )
    assert status == 2 and message in one_line_error(err)
    with pytest.raises(DynconvertError, match=message) as info:
        FinetuneOptions(plot=out_dir / name)
    assert info.value.usage


def _weights(kind: str, path: Path) -> Path:
    if kind == "folder":
        path.mkdir()
    elif kind == "another model":  # 40 keys, none of tinynet's
        torch.save({f"block{i}.weight": torch.zeros(2) for i in range(40)}, path)
    elif kind == "another head":
        import tinynet

        torch.save(tinynet.tiny(num_classes=5).state_dict(), path)
    elif kind == "corrupt":
        path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    elif kind == "pickled module":
        torch.save(nn.Linear(2, 2), path)
    elif kind == "not a state dict":
        torch.save({"epoch": 3, "lr": 0.1}, path)
    return path


@pytest.mark.parametrize(
    ("kind", "status", "messages"),
    [
        ("folder", 2, ["is a folder"]),
        (
            "another model",
            1,
            [
                "{n} keys missing (0.weight, 0.bias, 0.",  # n: tinynet's key count
                "and {more} more",
                "40 keys unexpected (block0.weight",
                "--model the weights come from",
            ],
        ),
        ("another head", 1, ["2 keys of another shape (9.weight (5, 8) in the file vs (3, 8)"]),
        ("corrupt", 1, ["corrupt", "--weights takes a state dict"]),
        ("pickled module", 1, ["pickled code (torch.nn.modules.linear.Linear)", "nothing was"]),
        ("not a state dict", 1, ["not a state dict of tensors", "model.state_dict()"]),
    ],
)
def test_bad_weights_are_one_short_line(
    tmp_path, capsys, code, data, out_dir, kind, status, messages
):
    import tinynet

    weights = _weights(kind, tmp_path / "w.pth")
    # BatchNorm fills in a missing num_batches_tracked (older files have none)
    n = sum(not k.endswith("num_batches_tracked") for k in tinynet.tiny().state_dict())
    messages = [m.format(n=n, more=n - 3) for m in messages]
    result, err = finetune_tiny(capsys, data, "--weights", weights, "--out", out_dir / "ft.pt")
    assert result == status
    line = one_line_error(err)
    assert all(m in line for m in messages), line
    assert len(line) < 400 and "weights_only" not in line
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("spec", "status", "message"),
    [
        ("plainnet:X", 2, "plainnet:X is not callable (it is of type int)"),
        ("plainnet:needs_args", 2, "cannot be called without arguments"),
        ("plainnet:nothing", 2, "plainnet has no 'nothing'"),
        ("plainnet:not_a_model", 1, "plainnet:not_a_model() returned int, not a torch.nn.Module"),
        ("badimport:net", 1, "importing badimport (for badimport:net) raised ValueError: boom"),
        ("needsdep:net", 1, "No module named 'surely_not_installed_dependency_xyz'"),
        ("no_such_module_xyz:net", 2, "no such module; it must be importable"),
    ],
)
def test_bad_model_spec_is_one_line_naming_it(capsys, code, data, out_dir, spec, status, message):
    result, err = run(
        capsys, "finetune", "--model", spec, "--data", data, "--out", out_dir / "ft.pt", *FAST
    )
    assert result == status
    line = one_line_error(err)
    assert message in line and spec.partition(":")[0] in line
    if spec.startswith("no_such_module"):
        assert "PYTHONPATH" in line  # the installed script does not search the current folder
    assert list(out_dir.iterdir()) == []


def test_image_suffixed_file_that_is_no_image_is_skipped_and_counted(
    tmp_path, capsys, code, data, out_dir
):
    (data / "train" / "a" / "bad.png").write_text("not an image")
    (data / "val" / "b" / "bad.jpg").write_bytes(b"")
    dataset = image_folder(data / "train", None, "train")
    assert [Path(p).name for p, _ in dataset.samples].count("bad.png") == 0
    assert dataset.skipped_files == 1
    status, err = finetune_tiny(capsys, data, "--out", out_dir / "ft.pt")
    assert status == 0, err
    assert "skipped 2 non-image files" in err
    only_bad = tmp_path / "bad"
    (only_bad / "a").mkdir(parents=True)
    (only_bad / "a" / "x.png").write_text("not an image")
    with pytest.raises(DynconvertError, match=r"has no images \(1 non-image files skipped\)"):
        image_folder(only_bad, None, "train")


def test_val_without_train_is_refused_and_train_without_val_says_so(
    tmp_path, capsys, code, out_dir
):
    only_val = make_image_folder(tmp_path / "v" / "val")
    status, err = finetune_tiny(capsys, only_val.parent, "--out", out_dir / "ft.pt")
    assert status == 2
    assert f"no train/ folder in {only_val.parent}" in one_line_error(err)
    assert list(out_dir.iterdir()) == []
    only_train = make_image_folder(tmp_path / "t" / "train", per_class=4).parent
    status, err = finetune_tiny(capsys, only_train, "--out", out_dir / "ft.pt")
    assert status == 0, err
    assert f"note: {only_train} has no val/ folder, so no validation is done" in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "{out}/ft.ckpt"], "is also the training checkpoint"),
        (["--out", "{out}/ft.pt", "--checkpoint", "{out}/ft.pt"], "--out and --checkpoint are"),
        (
            ["--out", "{out}/ft.pt", "--plot", "{out}/ft.png", "--checkpoint", "{out}/ft.png"],
            "--plot and --checkpoint are the same file",
        ),
    ],
)
def test_out_checkpoint_and_plot_must_be_different_files(
    capsys, code, data, out_dir, extra, message
):
    extra = [a.format(out=out_dir) for a in extra]
    status, err = finetune_tiny(capsys, data, *extra)
    assert status == 2 and message in one_line_error(err)
    assert list(out_dir.iterdir()) == []


def test_saved_custom_model_without_model_names_the_cli_option(tmp_path, capsys, code, data):
    import tinynet

    dynconvert.save(tinynet.tiny(), tmp_path / "model.pt")
    status, err = run(
        capsys,
        "finetune",
        tmp_path / "model.pt",
        "--data",
        data,
        "--out",
        tmp_path / "ft.pt",
        *FAST,
    )
    assert status == 2  # usage: the CLI needs --model
    line = one_line_error(err)
    assert "holds a custom model" in line and "--model package.module:function" in line
    assert "dynconvert.load(" not in line
