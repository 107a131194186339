"""``dynconvert finetune``: end to end through the CLI, and every bad input as one clear line."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from finetune_helpers import make_data_dir, make_image_folder, write_tinynet

import dynconvert
from dynconvert.cli import main

FAST = ["--epochs", "1", "--batch-size", "4", "--input-size", "16", "--no-progress"]


@pytest.fixture
def tinynet(tmp_path, monkeypatch):
    """``--model tinynet:tiny``: a seeded tiny dynamic model in an importable module."""
    (tmp_path / "code").mkdir()
    monkeypatch.syspath_prepend(str(write_tinynet(tmp_path / "code")))
    return "tinynet:tiny"


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_user_model_end_to_end_with_plot_checkpoint_and_saved_file(tmp_path, capsys, tinynet):
    data = make_data_dir(tmp_path / "data")
    out, plot = tmp_path / "ft.pt", tmp_path / "curves.png"
    code, err = run(
        capsys,
        "finetune",
        "--model",
        tinynet,
        "--data",
        data,
        "--out",
        out,
        "--plot",
        plot,
        "--temperature-start",
        "4",
        *FAST,
    )
    assert code == 0, err
    assert "after fine-tuning" in err and "attention health" in err
    assert "routers uniform (mean kernels)" in err  # what the attention adds
    saved = torch.load(out, weights_only=True)
    assert saved["format"] == "dynconvert"
    ckpt = torch.load(tmp_path / "ft.ckpt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in saved["state_dict"].items())
    assert ckpt["val_top1_original"] == ckpt["val_top1_before"]  # static copy == converted
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_dynconvert_file_of_a_timm_model_with_num_classes_reset(tmp_path, capsys):
    import timm

    model, report = dynconvert.convert(timm.create_model("test_resnet", pretrained=False), k=2)
    dynconvert.save(model, tmp_path / "model.pt", report=report)
    data = make_data_dir(tmp_path / "data", per_class=4)
    args = ["finetune", tmp_path / "model.pt", "--data", data, "--out", tmp_path / "ft.pt", *FAST]
    code, err = run(capsys, *args)
    assert code == 2
    assert "head has 1000 outputs but the data has 3 classes" in error_line(err)
    assert "--num-classes 3" in err
    code, err = run(capsys, *args, "--num-classes", "3")
    assert code == 0, err
    reloaded = dynconvert.load(tmp_path / "ft.pt")
    assert reloaded.num_classes == 3
    assert any(isinstance(m, dynconvert.DynamicConvNd) for m in reloaded.modules())


def test_saved_custom_model_file_with_its_architecture(tmp_path, capsys, tinynet):
    import tinynet as tinynet_module

    model = tinynet_module.tiny()
    dynconvert.save(model, tmp_path / "model.pt")
    data = make_data_dir(tmp_path / "data", per_class=2)
    args = ["finetune", tmp_path / "model.pt", "--data", data, "--out", tmp_path / "ft.pt", *FAST]
    code, err = run(capsys, *args)
    assert code == 2 and "holds a custom model" in error_line(err)  # needs --model
    code, err = run(capsys, *args, "--model", tinynet)
    assert code == 0, err
    reloaded = dynconvert.load(tmp_path / "ft.pt", model=tinynet_module.tiny())
    final = torch.load(tmp_path / "ft.ckpt", weights_only=True)["model"]
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in final.items())


def test_non_image_files_are_skipped_with_a_count(tmp_path, capsys, tinynet):
    data = make_data_dir(tmp_path / "data")
    (data / "train" / "a" / "notes.txt").write_text("x")
    (data / "val" / "b" / "Thumbs.db").write_bytes(b"x")
    code, err = run(
        capsys, "finetune", "--model", tinynet, "--data", data, "--out", tmp_path / "ft.pt", *FAST
    )
    assert code == 0, err
    assert "skipped 2 non-image files" in err


def _bad_data(kind: str, root: Path) -> Path:
    if kind == "missing":
        return root / "nowhere"
    if kind == "empty":
        (root / "train").mkdir(parents=True)
    elif kind == "no class folders":
        (root / "train").mkdir(parents=True)
        (root / "train" / "img.png").write_bytes(b"x")
    elif kind == "only non-images":
        for split in ("train", "val"):
            (root / split / "a").mkdir(parents=True)
            (root / split / "a" / "readme.md").write_text("x")
    elif kind == "different classes":
        make_image_folder(root / "train", ("a", "b", "c"), 2)
        make_image_folder(root / "val", ("a", "b", "d"), 2)
    return root


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "does not exist"),
        ("empty", "no class folders"),
        ("no class folders", "no class folders"),
        ("only non-images", r"has no images \(1 non-image files skipped\)"),
        ("different classes", r"different classes \(only in train: \['c'\]; only in val: \['d'\]"),
    ],
)
def test_bad_data_folder_is_one_line_and_writes_nothing(tmp_path, capsys, tinynet, kind, message):
    data = _bad_data(kind, tmp_path / "data")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    code, err = run(
        capsys, "finetune", "--model", tinynet, "--data", data, "--out", out_dir / "ft.pt", *FAST
    )
    assert code == 2
    assert re.search(message, error_line(err)), err
    assert "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_bad_recipe_is_rejected_before_any_work(tmp_path, capsys, tinynet):
    data = make_data_dir(tmp_path / "data", per_class=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune:\n  epochs: 1\n  learning_rate: 0.1\n")
    code, err = run(
        capsys,
        "finetune",
        "--model",
        tinynet,
        "--data",
        data,
        "--recipe",
        recipe,
        "--out",
        tmp_path / "ft.pt",
    )
    assert code == 2 and "unknown key finetune.learning_rate" in error_line(err)
    recipe.write_text("finetune:\n  epochs: three\n")
    code, err = run(
        capsys,
        "finetune",
        "--model",
        tinynet,
        "--data",
        data,
        "--recipe",
        recipe,
        "--out",
        tmp_path / "ft.pt",
    )
    assert code == 2 and "finetune.epochs must be int, got str 'three'" in error_line(err)
    assert not (tmp_path / "ft.pt").exists()


def test_recipe_values_are_used_and_flags_override_them(tmp_path, capsys, tinynet):
    data = make_data_dir(tmp_path / "data", per_class=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "finetune:\n  epochs: 3\n  batch_size: 2\n  lr: 0.5\n  temperature_start: 9.0\n"
        "  kernel_lr_scale: 4\n  kernel_grad_scale: 0.5\n"
        f"data:\n  path: {data}\n  input_size: 16\n"
    )
    code, err = run(
        capsys,
        "finetune",
        "--model",
        tinynet,
        "--recipe",
        recipe,
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--out",
        tmp_path / "ft.pt",
        "--no-progress",
    )
    assert code == 0, err
    state = torch.load(tmp_path / "ft.ckpt", weights_only=True)
    options = state["options"]
    assert (options["epochs"], options["lr"], options["batch_size"]) == (1, 0.01, 2)
    assert options["temperature_start"] == 9.0 and options["input_size"] == 16
    assert (options["kernel_lr_scale"], options["kernel_grad_scale"]) == (4.0, 0.5)
    # the K kernels' parameter group starts at lr * kernel_lr_scale, the others at lr
    initial_lrs = sorted({g["initial_lr"] for g in state["optimizer"]["param_groups"]})
    assert initial_lrs == pytest.approx([0.01, 0.04])


def test_recipe_kernel_lr_scale_is_overridden_by_its_flag(tmp_path, capsys, tinynet):
    from dynconvert.model_request import collect_options

    recipe = tmp_path / "r.yaml"
    recipe.write_text("finetune:\n  kernel_lr_scale: 4\n  kernel_grad_scale: 0.5\n")
    flags = {"recipe": recipe, "data": tmp_path, "kernel_lr_scale": 2.0, "kernel_grad_scale": None}
    options, _, _ = collect_options(flags)
    assert (options["kernel_lr_scale"], options["kernel_grad_scale"]) == (2.0, 0.5)


def test_resume_from_another_models_checkpoint_fails_clearly(tmp_path, capsys, tinynet):
    data = make_data_dir(tmp_path / "data", per_class=2)
    four = make_data_dir(tmp_path / "d4", classes=("a", "b", "c", "d"), per_class=2)
    code, err = run(
        capsys,
        "finetune",
        "--model",
        tinynet,
        "--data",
        four,
        "--num-classes",
        "4",
        "--out",
        tmp_path / "four.pt",
        *FAST,
    )
    assert code == 0, err
    code, err = run(
        capsys,
        "finetune",
        "--model",
        tinynet,
        "--data",
        data,
        "--resume",
        tmp_path / "four.ckpt",
        "--out",
        tmp_path / "ft.pt",
        *FAST,
    )
    assert code == 1
    assert "was written for another model" in error_line(err)
    assert not (tmp_path / "ft.pt").exists()


def test_unwritable_output_path_fails_before_training(tmp_path, capsys, tinynet):
    data = make_data_dir(tmp_path / "data", per_class=2)
    code, err = run(
        capsys,
        "finetune",
        "--model",
        tinynet,
        "--data",
        data,
        "--out",
        tmp_path / "missing" / "ft.pt",
        *FAST,
    )
    assert code == 1 and "does not exist" in error_line(err)
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        code, err = run(
            capsys, "finetune", "--model", tinynet, "--data", data, "--out", locked / "ft.pt", *FAST
        )
        locked.chmod(0o755)
        assert code == 1 and "not writable" in error_line(err)
        assert list(locked.iterdir()) == []


SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_VAL = SHARED / "data" / "cifar10-jpeg" / "val.tar.gz"
RESNET20 = SHARED / "models" / "cifar10-resnet20-12fca82f.th"


def extract_cifar_subset(dest: Path, train_per_class: int, val_per_class: int) -> Path:
    """Files 0000.. of each class of val.tar.gz: the first ones as train/, the next as val/."""
    import tarfile

    with tarfile.open(CIFAR_VAL) as tar:
        for member in tar:
            parts = Path(member.name).parts  # val/<class>/<nnnn>.jpg
            if not member.isfile() or len(parts) != 3:
                continue
            index = int(Path(parts[2]).stem)
            split = "train" if index < train_per_class else "val"
            if index >= train_per_class + val_per_class:
                continue
            target = dest / split / parts[1] / parts[2]
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(tar.extractfile(member).read())
    return dest


@pytest.mark.skipif(not CIFAR_VAL.exists(), reason="../shared CIFAR-10 data not present")
def test_cifar10_resnet20_end_to_end_through_the_cli(tmp_path, capsys, monkeypatch):
    """The shipped recipe (static model + weights + convert section) on real images."""
    from dynconvert.zoo.cifar_resnet import cifar_resnet20

    data = extract_cifar_subset(tmp_path / "cifar", train_per_class=10, val_per_class=4)
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)  # the recipe's weights path is relative to the repository
    out = tmp_path / "ft.pt"
    code, err = run(
        capsys,
        "finetune",
        "--recipe",
        repo / "recipes" / "cifar10-resnet20.yaml",
        "--data",
        data,
        "--epochs",
        "1",
        "--batch-size",
        "20",
        "--train-subset",
        "40",
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, err
    ckpt = torch.load(tmp_path / "ft.ckpt", weights_only=True)
    assert ckpt["iteration"] == 2  # 40 of the 100 train images, batch 20
    # the trained ResNet-20 (81% on the full val set) and its conversion agree to the image
    assert ckpt["val_top1_original"] == ckpt["val_top1_before"] > 50.0
    assert ckpt["history"][0]["val_top1"] > 50.0
    saved = torch.load(out, weights_only=True)
    assert len(saved["converted"]) == 18  # every conv but the stem
    reloaded = dynconvert.load(out, model=cifar_resnet20())
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in ckpt["model"].items())
