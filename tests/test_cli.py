"""The command line: help with examples, dataset listing, and one-line errors instead of tracebacks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cellkit import cli


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``cellkit ARGS`` in a fresh interpreter, as a user would."""
    import os

    return subprocess.run(
        [sys.executable, "-m", "cellkit.cli", *args], capture_output=True, text=True, timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    "command", [[], ["data"], ["data", "list"], ["data", "check"], ["data", "fetch"], ["run-notebooks"]]
)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


def _commands(parser, words=()):
    """Every command path of the parser, e.g. ("evaluate", "segmentation")."""
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*words, name)
                yield from _commands(sub, (*words, name))


@pytest.mark.parametrize("command", sorted(_commands(cli.build_parser())), ids=" ".join)
def test_every_subcommand_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "example" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["segment"], ["classify"], ["evaluate", "classifier"],
                                     ["evaluate", "segmentation"], ["train", "classifier"], ["train", "unet"]])
def test_commands_that_write_results_offer_overwrite(command, capsys):
    with pytest.raises(SystemExit):
        cli.main([*command, "--help"])
    assert "--overwrite" in capsys.readouterr().out


def test_a_system_error_is_one_line():
    error = PermissionError(13, "Permission denied", "/data/out.csv")
    assert cli._one_line(error) == "/data/out.csv: Permission denied"


def test_data_list_shows_location_licence_and_citation(real_data):
    result = run_cli("data", "list")
    assert result.returncode == 0, result.stderr
    for folder in real_data.values():
        assert str(folder) in result.stdout
    assert "CC BY 4.0" in result.stdout and "CC0" in result.stdout
    assert "doi:10.1016/j.dib.2020.105474" in result.stdout and "doi:10.1038/s41592-019-0612-7" in result.stdout


def test_data_list_without_data_says_how_to_fetch(no_real_data):
    result = run_cli("data", "list")
    assert result.returncode == 0
    assert "cellkit data fetch pbc" in result.stdout and "cellkit data fetch dsb2018" in result.stdout


def test_data_check_fails_in_one_line_without_data(no_real_data):
    result = run_cli("data", "check")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "CELLKIT_DATA_DIR" in result.stderr


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:  # bound, never listening: a connection is refused at once
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_data_check_fetch_that_fails_names_the_alternative_in_one_line(no_real_data):
    mirror = f"http://127.0.0.1:{_closed_port()}"
    result = run_cli("data", "check", "--fetch", "--quiet", env={"CELLKIT_DOWNLOAD_MIRROR": mirror})
    assert result.returncode == 1 and "fetching dsb2018 pbc" in result.stdout
    last = result.stderr.strip().splitlines()[-1]  # above it: the downloader's line saying what it tried
    assert last.startswith("error: fetching dsb2018 pbc failed") and "CELLKIT_DATA_DIR" in last
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr


def test_data_check_fetch_with_the_data_present_fetches_nothing(real_data):
    result = run_cli("data", "check", "--fetch", env={"CELLKIT_DOWNLOAD_MIRROR": "http://127.0.0.1:9"})
    assert result.returncode == 0, result.stderr
    assert "fetching" not in result.stdout and "MISSING" not in result.stdout


def test_unknown_notebook_is_a_one_line_error():
    result = run_cli("run-notebooks", "--only", "99")
    assert result.returncode == cli.EXIT_BAD_INPUT
    assert result.stderr.strip().startswith("error:") and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1


def test_unknown_profile_is_rejected_with_the_choices():
    result = run_cli("run-notebooks", "--profile", "huge")
    assert result.returncode == 2 and "smoke" in result.stderr and "Traceback" not in result.stderr
