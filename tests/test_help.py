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


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_text_fills_an_80_column_terminal(name):
    """typer keeps the docstring's line breaks after the first paragraph, and rich wrapped
    each docstring line on its own: a short stub after every long line at 80 columns.
    Reflowed, every line of a paragraph but its last is filled."""
    result = runner.invoke(app, [name, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    text = result.output.split("╭")[0]  # the description, above the boxes
    # every word of the docstring is there, in order (the usage line comes first)
    assert _plain(text).endswith(_plain(COMMANDS[name].help)), name
    for paragraph in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in paragraph.splitlines() if line.strip()]
        short = [line for line in lines[:-1] if len(line) < 55 and not line.startswith("Usage")]
        assert not short, (name, short)


def test_reflow_joins_the_lines_of_a_paragraph_but_not_list_items_or_verbatim_blocks():
    from ensemble_kernel.cli.common import _reflow

    text = """First line.

    A paragraph
    on three
    lines.

    - an item
      that goes on
    - another

    \b
    kept
    as is"""
    assert _reflow(text) == ("First line.\n\nA paragraph on three lines.\n\n"
                             "- an item that goes on\n- another\n\n\b\nkept\nas is")


@pytest.mark.parametrize("text, reflowed", [
    ("First.\n\nPara one\ncontinues.\n  \nPara two.",  # a blank line with spaces in it
     "First.\n\nPara one continues.\n\nPara two."),
    ("First.\n\nSee:\n  ensemble-kernel a --x 1\n  ensemble-kernel b --y 2",  # commands
     "First.\n\nSee:\n  ensemble-kernel a --x 1\n  ensemble-kernel b --y 2"),
    ("First.\n\n* star\n  more\n* two\n1. one\n2. two",
     "First.\n\n* star more\n* two\n1. one\n2. two"),
])
def test_reflow_keeps_paragraphs_commands_and_lists_apart(text, reflowed):
    from ensemble_kernel.cli.common import _reflow

    assert _reflow(text) == reflowed
    assert _reflow(reflowed) == reflowed  # (the app reflows at every call)
