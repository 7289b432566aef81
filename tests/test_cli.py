"""The meshplan command: listings, and exit code 2 for bad input."""

from __future__ import annotations

import pytest

from meshplan.cli import main
from meshplan.lightning import REGISTERED_STRATEGIES
from meshplan.recipes import CATALOGUE_DIR


def test_strategies_lists_every_registered_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(REGISTERED_STRATEGIES)


def test_unknown_command_exits_with_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


def test_recipes_path_prints_the_catalogue_file_for_a_launcher(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    # For `accelerate launch --config_file "$(meshplan recipes --path zero3)"`, outside a checkout too.
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "--path", "zero3"]) == 0
    assert capsys.readouterr().out == f"{CATALOGUE_DIR / 'zero3.yaml'}\n"
    (tmp_path / "zero3.yaml").write_text("distributed_type: MULTI_GPU\n")
    assert main(["recipes", "--path", "zero3.yaml"]) == 0  # a file here comes first, as everywhere
    assert capsys.readouterr().out == f"{tmp_path / 'zero3.yaml'}\n"


def test_recipes_path_of_an_unknown_name_exits_with_code_2_and_lists_the_catalogue(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["recipes", "--path", "zero4"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("meshplan recipes: --path 'zero4': there is no such file, and it is no "
                                   "catalogue name")
    assert "zero3-offload" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_recipes_path_of_a_directory_exits_with_code_2_but_a_catalogue_name_wins_over_one(
        tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert main(["recipes", "--path", "runs"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"meshplan recipes: --path 'runs': '{tmp_path / 'runs'}' is a directory, not a recipe file")
    (tmp_path / "zero3").mkdir()  # an output folder named like a recipe does not shadow it
    assert main(["recipes", "--path", "zero3"]) == 0
    assert capsys.readouterr().out == f"{CATALOGUE_DIR / 'zero3.yaml'}\n"
