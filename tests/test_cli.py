"""The meshplan command: listings, and exit code 2 for bad input."""

from __future__ import annotations

import pytest

from meshplan.cli import main
from meshplan.lightning import REGISTERED_STRATEGIES


def test_strategies_lists_every_registered_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["strategies"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(REGISTERED_STRATEGIES)


def test_unknown_command_exits_with_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err
