"""Recipes: the shipped YAML files validate; unknown keys and wrong types are named."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_export_cli import assert_one_line_error, run

from dynconvert import DynconvertError
from dynconvert.finetune import FinetuneOptions
from dynconvert.recipes import load_recipe, validate_recipe

TIMM_NAME = "test_resnet"  # timm's tiny test model

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate(path):
    recipe = load_recipe(path)
    assert recipe.model.get("name")
    options = FinetuneOptions.from_kwargs(**recipe.finetune_options())
    assert options.epochs >= 1


def test_imagenet_recipes_carry_the_papers_settings():
    for name in ("resnet50-imagenet.yaml", "mobilenetv2-imagenet.yaml"):
        recipe = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / name)
        assert recipe.convert["k"] == 4 and recipe.convert["ratio"] == 0.25
        assert recipe.finetune["temperature_start"] == 30.0
        assert recipe.finetune["temperature_end"] == 1.0


def test_sections_map_to_finetune_options():
    recipe = validate_recipe(
        {
            "model": {"name": "resnet18", "num_classes": 10},
            "convert": {"k": 2, "exclude": ["layer4.*"]},
            "finetune": {"epochs": 2, "lr": 0.1, "distill": True},
            "data": {"path": "/data", "input_size": 32, "train_subset": 100},
        }
    )
    assert recipe.finetune_options() == {
        "epochs": 2,
        "lr": 0.1,
        "teacher": True,
        "input_size": 32,
        "train_subset": 100,
    }
    assert recipe.data["path"] == "/data"


def test_kernel_lr_and_grad_scales_are_recipe_keys():
    recipe = validate_recipe({"finetune": {"kernel_lr_scale": 4, "kernel_grad_scale": 0.25}})
    options = FinetuneOptions.from_kwargs(**recipe.finetune_options())
    assert (options.kernel_lr_scale, options.kernel_grad_scale) == (4.0, 0.25)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"trainer": {}}, "unknown section 'trainer'"),
        ({"finetune": {"learning_rate": 0.1}}, "unknown key finetune.learning_rate"),
        ({"data": {"folder": "x"}}, "unknown key data.folder"),
        ({"convert": {"kernels": 4}}, "unknown key convert.kernels"),
        ({"model": {"arch": "x"}}, "unknown key model.arch"),
        ({"finetune": {"epochs": "3"}}, "finetune.epochs must be int, got str '3'"),
        ({"finetune": {"epochs": 2.5}}, "finetune.epochs must be int"),
        ({"finetune": {"lr": "fast"}}, "finetune.lr must be number"),
        ({"finetune": {"nesterov": 1}}, "finetune.nesterov must be true/false"),
        ({"finetune": {"epochs": True}}, "finetune.epochs must be int"),
        ({"data": {"mean": 0.5}}, "data.mean must be list or null"),
        ({"finetune": {"epochs": 0}}, "epochs: expected an int >= 1"),
        ({"finetune": {"optimizer": "rmsprop"}}, "optimizer: expected one of sgd, adamw"),
        ({"convert": {"k": 0}}, "convert.k: expected an int >= 1"),
        ({"finetune": {"kernel_lr_scale": "x"}}, "finetune.kernel_lr_scale must be number"),
        ({"finetune": {"kernel_lr_scale": 0}}, "kernel_lr_scale: must be > 0"),
        ({"finetune": {"kernel_grad_scale": -1}}, "kernel_grad_scale: must be > 0"),
        ({"finetune": [1, 2]}, "section 'finetune' must be a mapping"),
        ([1, 2], "expected a mapping of sections"),
    ],
)
def test_bad_recipes_name_the_key(raw, message):
    with pytest.raises(DynconvertError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate_recipe(raw, "r.yaml")


def test_recipe_file_errors(tmp_path):
    with pytest.raises(DynconvertError, match="does not exist"):
        load_recipe(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: [unclosed\n")
    with pytest.raises(DynconvertError, match="not valid YAML"):
        load_recipe(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_recipe(empty).finetune_options() == {}


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("finetune:\n  lr: 1e-3\n  weight_decay: 5E-5\n  attention_lr: +2.5e+1\n")
    recipe = load_recipe(path)
    assert recipe.finetune == {"lr": 1e-3, "weight_decay": 5e-5, "attention_lr": 25.0}
    import yaml

    assert yaml.safe_load("x: 1e-3")["x"] == "1e-3"  # PyYAML's own loader is left alone


# -- recipe structure ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("- a\n- b\n", ["mapping of sections", "top level", "list"]),
        ("finetune: 5\n", ["section 'finetune' must be a mapping", "int 5"]),
        ("finetune:\n  epochs: [1\n", ["not valid YAML at line 3, column 1", "flow sequence"]),
        ("finetune:\n  lr: 0.1\n  epochs: 1\n  epochs: 2\n",
         ["duplicate key 'epochs' at line 4", "line 3"]),
        ("finetune:\n  epochs: 1\nfinetune:\n  epochs: 2\n", ["duplicate key 'finetune'"]),
    ],
)  # fmt: skip
def test_recipe_structure_errors_are_usage_errors(tmp_path, capsys, text, fragments):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(DynconvertError) as caught:
        load_recipe(path)
    assert caught.value.usage
    for fragment in fragments:
        assert fragment in str(caught.value)
    code, _, err = run(capsys, TIMM_NAME, "--no-pretrained", "--out", tmp_path / "m.pt",
                       "--recipe", path, "--data", tmp_path)  # fmt: skip
    assert code == 2
    assert_one_line_error(err, *fragments)


def test_recipe_merge_keys_are_not_duplicates(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("finetune:\n  <<: {epochs: 1, lr: 0.1}\n  epochs: 2\n")
    assert load_recipe(path).finetune == {"epochs": 2, "lr": 0.1}


def test_recipe_folder_is_named_a_folder(tmp_path):
    with pytest.raises(DynconvertError, match="is a folder") as caught:
        load_recipe(tmp_path)
    assert caught.value.usage and "does not exist" not in str(caught.value)
