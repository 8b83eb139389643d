"""One command style: every command takes Hydra `key=value` overrides of its own config, lists its settings on
`--help`, and says a mistake in one `error:` line with exit code 2."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from mvtec_seg import export, predict
from mvtec_seg.cli import arg_types, command_args, compose_command
from mvtec_seg.errors import UserError
from mvtec_seg.report import build

COMMANDS = {"predict": predict, "export": export, "report": build}
FUNCTIONS = {"predict": predict.predict, "export": export.export_onnx, "report": build.build_report}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_setting_is_typed_once_and_help_lists_it(name: str, capsys) -> None:
    """The YAML names the settings; the function they are passed to types them (no third list)."""
    module = COMMANDS[name]
    cfg = compose_command(name, [])
    types = arg_types(cfg, FUNCTIONS[name])
    assert set(types) == set(OmegaConf.to_container(cfg)) and set(types.values()) <= {str, int, float, bool}
    assert module.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert f"python -m mvtec_seg.{name}" in out
    for key in types:
        assert f"  {key}=" in out, key


def test_types_come_from_the_function() -> None:
    types = arg_types(compose_command("predict", []), predict.predict)
    assert types == {
        "run": str,
        "input": str,
        "output": str,
        "threshold": float,
        "trainer": str,
        "batch_size": int,
        "image_size": int,
        "format": str,
        "overwrite": bool,
        "max_image_pixels": int,
        "check": bool,
    }
    assert arg_types(compose_command("export", []), export.export_onnx)["format"] is str  # by its default


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["colour=red"], "unknown setting 'colour'"),
        (["outputs/runs"], "is not key=value"),
        (["run=r", "input=x", "threshold=high"], "threshold='high' is not a number"),
        (["run=r", "input=x", "overwrite=maybe"], "overwrite='maybe' is not true or false"),
        (["input=x"], "run= is required"),
    ],
)
def test_mistakes_are_one_line_exit_2(argv: list[str], message: str, capsys) -> None:
    assert predict.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_values_are_typed_by_the_schema() -> None:
    cfg = compose_command("predict", ["run=123", "input=a/*.png", "threshold=1", "batch_size=2"])
    args = command_args(cfg, predict.predict)
    assert args["run"] == "123" and args["input"] == "a/*.png"  # paths stay text, globs stay patterns
    assert args["threshold"] == 1.0 and isinstance(args["threshold"], float) and args["batch_size"] == 2
    with pytest.raises(UserError, match="batch_size=True is not a whole number"):
        command_args(compose_command("predict", ["batch_size=true"]), predict.predict)


def test_report_takes_the_folder_positionally_too(tmp_path, capsys) -> None:
    assert build.main([str(tmp_path / "none")]) == 2
    assert "none" in capsys.readouterr().err
