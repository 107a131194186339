"""Each option is written once, in its options dataclass: its CLI flag, its recipe key, its
API keyword default and its help all come from the field."""

from __future__ import annotations

import dataclasses
import inspect

import click
import pytest
import torch
from click.testing import CliRunner

import dynconvert
from dynconvert import recipes
from dynconvert.cli.convert_cmd import conversion_options, convert_command
from dynconvert.cli.export_cmd import export_command
from dynconvert.cli.finetune_cmd import finetune_command
from dynconvert.cli.options import dataclass_options
from dynconvert.convert import api as convert_api
from dynconvert.convert.config import ConvertConfig
from dynconvert.export import api as export_api
from dynconvert.export.options import FORMAT_NAMES, ExportOptions
from dynconvert.finetune.options import FinetuneOptions
from dynconvert.model_request import CONVERSION_OPTIONS
from dynconvert.option_fields import cli_fields, default_of, flag_name, meta, recipe_schema


def _params(command: click.Command) -> dict[str, click.Parameter]:
    return {p.name: p for p in command.params}


def test_every_convert_field_is_a_recipe_key_and_a_conversion_option():
    names = [f.name for f in dataclasses.fields(ConvertConfig)]
    assert list(recipes.CONVERT_SCHEMA) == names
    assert set(CONVERSION_OPTIONS) == set(names)


def test_convert_flags_match_the_fields():
    params = _params(convert_command)
    for field in cli_fields(ConvertConfig):
        param = params[field.name]
        assert f"--{field.name.replace('_', '-')}" in param.opts
        assert param.help == meta(field, "help")
        if not meta(field, "repeatable"):
            assert param.default == default_of(field)
        choices = meta(field, "choices")
        if choices is not None:
            assert tuple(param.type.choices) == choices
    hidden = {f.name for f in dataclasses.fields(ConvertConfig)} - set(params)
    assert hidden == {"dims", "noise"}  # declared cli=False


def test_convert_keyword_defaults_are_the_fields():
    signature = inspect.signature(convert_api.convert)
    for field in dataclasses.fields(ConvertConfig):
        assert repr(signature.parameters[field.name].default) == repr(default_of(field))


def test_finetune_flags_match_the_fields():
    params = _params(finetune_command)
    for field in cli_fields(FinetuneOptions):
        param = params[field.name]
        assert flag_name(field) in param.opts
        default = default_of(field)
        if meta(field, "recipe", "") is not None:  # a recipe may fill it: None means not given
            assert param.default is None
            if default is not None:
                assert param.help.endswith(f"[default: {default}]")
        else:
            assert param.default == default


def test_export_flags_match_the_fields():
    params = _params(export_command)
    for field in cli_fields(ExportOptions):
        param = params[field.name]
        assert flag_name(field) in param.opts
        if meta(field, "choices") is not None:
            assert tuple(param.type.choices) == meta(field, "choices")
        if field.name == "format":  # the command's default: the --out suffix
            assert param.default is None and "--out suffix" in param.help
            continue
        assert param.help == meta(field, "help")
        assert param.default == default_of(field)
    hidden = {f.name for f in dataclasses.fields(ExportOptions)} - set(params)
    assert hidden == {"batch_sizes", "example_input", "show"}  # declared cli=False
    assert tuple(params["format"].type.choices) == FORMAT_NAMES


def test_export_keyword_defaults_are_the_fields():
    signature = inspect.signature(export_api.export)
    names = [f.name for f in dataclasses.fields(ExportOptions)]
    assert [n for n in signature.parameters if n in names] == names
    for field in dataclasses.fields(ExportOptions):
        assert repr(signature.parameters[field.name].default) == repr(default_of(field))
    assert signature.parameters["format"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD


def test_export_refuses_unknown_keywords():
    with pytest.raises(TypeError, match="fields of ExportOptions"):
        dynconvert.export(torch.nn.Identity(), "m.pt2", batch_size=3)


def test_finetune_recipe_keys_are_the_fields():
    finetune = {f.name for f in dataclasses.fields(FinetuneOptions) if meta(f, "recipe", "") == ""}
    data = {f.name for f in dataclasses.fields(FinetuneOptions) if meta(f, "recipe", "") == "data"}
    assert set(recipes.FINETUNE_SCHEMA) == finetune | {"distill"}
    assert set(recipes.DATA_SCHEMA) == data | {"path"}
    assert recipes.FINETUNE_SCHEMA["lr"] == (int, float)
    assert recipes.DATA_SCHEMA["mean"] == (list, type(None))


@dataclasses.dataclass(frozen=True)
class _WithNewOptions(ConvertConfig):
    """A new option added the way a developer adds one: a plain field, nothing else."""

    gate_mode: str = "hard"
    gate_scale: float | None = None


def test_a_new_plain_field_becomes_a_flag_and_a_recipe_key():
    schema = recipe_schema(_WithNewOptions)
    assert schema["gate_mode"] == (str,)
    assert schema["gate_scale"] == (int, float, type(None))

    seen = {}

    @click.command()
    @dataclass_options(_WithNewOptions)
    def command(**options):
        seen.update(options)

    result = CliRunner().invoke(command, ["--gate-mode", "soft", "--gate-scale", "2.5", "--k", "3"])
    assert result.exit_code == 0, result.output
    assert seen["gate_mode"] == "soft" and seen["gate_scale"] == 2.5 and seen["k"] == 3
    config = _WithNewOptions(**{k: v or None if k in ("include", "exclude") else v
                             for k, v in seen.items()})  # fmt: skip
    assert config.gate_mode == "soft"
    seen.clear()
    assert CliRunner().invoke(command, []).exit_code == 0
    assert seen["gate_mode"] == "hard" and seen["gate_scale"] is None


def test_conversion_options_refuse_out_of_range_values():
    @click.command()
    @conversion_options
    def command(**options):
        pass

    result = CliRunner().invoke(command, ["--ratio", "0"])
    assert result.exit_code == 2 and "--ratio" in result.output
    result = CliRunner().invoke(command, ["--depthwise", "keep"])
    assert result.exit_code == 2 and "convert" in result.output


@pytest.mark.parametrize("name", ["k", "temperature"])
def test_defaults_are_written_once(name):
    """The default of k and of the temperature lives in ConvertConfig only (outside layers/)."""
    import pathlib
    import re

    root = pathlib.Path(dynconvert.__file__).parent
    pattern = {"k": r"default=4\b|\bk: int = 4\b", "temperature": r"temperature: float = 1\.0"}
    found = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if "layers" not in path.parts and re.search(pattern[name], path.read_text())
    ]
    assert found == [], found
