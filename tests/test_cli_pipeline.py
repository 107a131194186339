"""The whole pipeline in one command: ``dynconvert MODEL --data DIR --out FILE`` converts,
fine-tunes and saves; recipes' convert and model sections apply to it."""

from __future__ import annotations

from pathlib import Path

import torch
from finetune_helpers import make_data_dir
from test_finetune_cli import error_line, run

import dynconvert


def test_pipeline_convert_finetune_save_in_one_command(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", per_class=4)
    out = tmp_path / "model.pt"
    code, err = run(
        capsys,
        "--debug",
        "test_resnet",
        "--no-pretrained",
        "--k",
        "2",
        "--data",
        data,
        "--epochs",
        "1",
        "--batch-size",
        "4",
        "--input-size",
        "32",
        "--num-classes",
        "3",
        "--out",
        out,
        "--no-progress",
    )
    assert code == 0, err
    assert "after fine-tuning" in err
    model = dynconvert.load(out)
    assert model.num_classes == 3
    ckpt = torch.load(tmp_path / "model.ckpt", weights_only=True)
    assert all(torch.equal(ckpt["model"][k], v) for k, v in model.state_dict().items())
    code, err = run(capsys, "test_resnet", "--no-pretrained", "--epochs", "2", "--out", out)
    assert code == 2 and "--epochs needs --data DIR" in error_line(err)


def kernel_counts(path: Path) -> set[int]:
    """K of every dynamic layer of a saved model."""
    from dynconvert.layers import DynamicConvNd

    return {
        m.weight.shape[0] for m in dynconvert.load(path).modules() if isinstance(m, DynamicConvNd)
    }


def test_pipeline_converts_with_the_recipes_convert_section_and_flags_override_it(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", per_class=2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "convert:\n  k: 2\n  noise: 0.0\n  exclude: ['layer2.*']\n  seed: 5\n"
        "finetune:\n  epochs: 1\n  batch_size: 6\n  seed: 3\n"
        f"data:\n  path: {data}\n  input_size: 32\n"
    )
    common = ["test_resnet", "--no-pretrained", "--recipe", recipe, "--num-classes", "3"]
    code, err = run(capsys, *common, "--out", tmp_path / "k2.pt", "--no-progress")
    assert code == 0, err
    saved = torch.load(tmp_path / "k2.pt", weights_only=True)
    assert kernel_counts(tmp_path / "k2.pt") == {2}
    assert saved["config"]["noise"] == 0.0 and saved["config"]["seed"] == 5
    assert saved["converted"] and not any(n.startswith("layer2.") for n in saved["converted"])
    assert torch.load(tmp_path / "k2.ckpt", weights_only=True)["options"]["seed"] == 3
    code, err = run(capsys, *common, "--k", "3", "--out", tmp_path / "k3.pt", "--no-progress")
    assert code == 0, err
    assert kernel_counts(tmp_path / "k3.pt") == {3}


def test_pipeline_takes_weights_from_the_recipes_model_section_only_for_that_model(
    tmp_path, capsys
):
    import timm

    data = make_data_dir(tmp_path / "data", per_class=2)
    torch.manual_seed(7)
    torch.save(timm.create_model("test_resnet").state_dict(), tmp_path / "w.pth")
    stem = torch.load(tmp_path / "w.pth", weights_only=True)["conv1.0.weight"]

    def recipe(name: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"model:\n  name: {name}\n  weights: {tmp_path / 'w.pth'}\n"
            "convert:\n  noise: 0.0\n"
            "finetune:\n  epochs: 1\n  batch_size: 6\n  lr: 1.0e-12\n"
            f"data:\n  path: {data}\n  input_size: 32\n"
        )
        return path

    def stem_after(*args) -> tuple[torch.Tensor, str]:
        out = tmp_path / "m.pt"
        code, err = run(capsys, "test_resnet", "--num-classes", "3", "--out", out, "--no-progress",
                        *args)  # fmt: skip
        assert code == 0, err
        return dict(dynconvert.load(out).named_parameters())["conv1.0.weight"], err

    # 1. The recipe names MODEL: its weights are the starting point (lr ~0 keeps them).
    weight, err = stem_after("--recipe", recipe("test_resnet"))
    torch.testing.assert_close(weight, stem, atol=1e-6, rtol=0)
    assert "note:" not in err
    # 2. --no-pretrained on the command line wins over the recipe's weights.
    weight, _ = stem_after("--recipe", recipe("test_resnet"), "--no-pretrained")
    assert (weight - stem).abs().max() > 1e-3
    # 3. The recipe names another model: its weights are not used, and a note says so.
    weight, err = stem_after("--recipe", recipe("resnet18"), "--no-pretrained")
    assert (weight - stem).abs().max() > 1e-3
    assert "note: MODEL test_resnet replaces the recipe's model.name resnet18" in err


def test_pipeline_on_a_saved_file_does_not_reconvert_and_says_so(tmp_path, capsys):
    data = make_data_dir(tmp_path / "data", per_class=2)
    saved = tmp_path / "k2.pt"
    code, err = run(capsys, "test_resnet", "--no-pretrained", "--k", "2", "--out", saved)
    assert code == 0, err
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "convert:\n  k: 3\nfinetune:\n  epochs: 1\n  batch_size: 6\n"
        f"data:\n  path: {data}\n  input_size: 32\n"
    )
    out = tmp_path / "ft.pt"
    code, err = run(capsys, saved, "--recipe", recipe, "--num-classes", "3", "--out", out,
                    "--no-progress")  # fmt: skip
    assert code == 0, err
    assert f"note: {saved} is already converted; the recipe's convert section" in err
    assert kernel_counts(out) == {2}
