"""The command line: every subcommand has a handler and help; the README's commands are the ones CI runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowmem_aasist.cli import COMMANDS, get_parser, main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: lowmem-aasist " + command in capsys.readouterr().out


def test_parser_knows_every_command():
    parser = get_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS) >= {"score", "fit", "demo-data"}


def test_readme_quick_start_matches_ci():
    readme = (ROOT / "README.md").read_text()
    ci_command = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci_command in readme, "the README's test command must be exactly what .ci/run runs"
    assert "lowmem-aasist fit --demo\n" in readme


@pytest.mark.parametrize(("argv", "names"), [
    (["fit", "--crop-from", "end"], "argument --crop-from: invalid choice: 'end'"),
    (["probe", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["frob"], "invalid choice: 'frob'"),
])
def test_bad_usage_is_one_line_naming_the_option(argv, names, capsys):
    # argparse printed its usage block (15 lines for fit) before the error line.
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and names in err and "--help" in err
