"""The command line as a new user meets it: optional extras named in one line, no command silently missing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from vlmgraft import cli
from vlmgraft.cli import main


@pytest.mark.parametrize(("argv", "missing", "extra"), [
    (["serve", "some-model"], "uvicorn", "serve"),
    (["serve", "some-model"], "fastapi", "serve"),
    (["export", "onnx", "some-model", "--out", "onnx-out"], "onnxruntime", "onnx"),
    (["export", "onnx", "some-model", "--out", "onnx-out"], "onnx", "onnx"),
])
def test_command_without_its_extra_names_the_extra(argv, missing, extra, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, missing, None)  # `import missing` now raises ModuleNotFoundError
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert f"pip install 'vlmgraft[{extra}]'" in err
    assert missing in err
    assert "\n" not in err and "Traceback" not in err


def test_all_extra_installs_every_optional_extra():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    listed = extras["all"][0].split("[")[1].rstrip("]").split(",")
    assert sorted(listed) == sorted(name for name in extras if name not in ("all", "dev"))


def test_a_command_module_that_does_not_import_is_an_error(monkeypatch):
    monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "vlmgraft.no_such_commands"))
    with pytest.raises(ImportError, match="vlmgraft.no_such_commands"):
        cli.make_parser()


def test_every_command_is_registered():
    parser = cli.make_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name in ("build", "audit", "data", "train", "merge", "chat", "detect", "serve", "eval", "export", "demo"):
        assert name in commands
