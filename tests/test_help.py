"""DESIGN §7: `--help` on every command. The commands are discovered from the app, so a new
command is covered without editing this file."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from ensemble_kernel.cli import app

runner = CliRunner()
COMMANDS = typer.main.get_command(app).commands  # name -> click command
WIDE = {"COLUMNS": "400"}  # one line per option, so that each help text stays whole


def _plain(text: str) -> str:
    return " ".join(text.split())


def test_the_app_lists_every_command():
    result = runner.invoke(app, ["--help"], env=WIDE)
    assert result.exit_code == 0 and "Traceback" not in result.output
    listed = set(re.findall(r"^\W*([a-z][a-z-]*)\s{2,}", result.output, flags=re.M))
    assert set(COMMANDS) <= listed, set(COMMANDS) - listed
    assert len(COMMANDS) >= 12  # evaluate ... report (DESIGN §7)


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_of_every_command_shows_every_option_and_its_help(name):
    command = COMMANDS[name]
    result = runner.invoke(app, [name, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Traceback" not in out and "Error" not in out
    assert f"{name} [OPTIONS]" in out  # the usage line
    assert _plain(command.help.split("\n\n")[0]) in _plain(out)  # the summary
    for param in command.params:
        if param.name == "help":
            continue
        names = list(getattr(param, "opts", [])) + list(getattr(param, "secondary_opts", []))
        if getattr(param, "param_type_name", "") == "argument":
            names = [param.name]
        lines = [line for line in out.splitlines()
                 if any(re.search(rf"(?<![\w-]){re.escape(n)}(?![\w-])", line) for n in names)]
        assert lines, f"{name} --help does not mention {names}"
        # The whole help text shows (rich markup must not eat any of it, e.g. "[...]").
        assert param.help and any(_plain(param.help) in _plain(line) for line in lines), (
            param.help, lines)
