"""The conformance matrix: front end x layout x the everyday API that front end documents.

Every conformance test asserts the outcome of each cell itself (a number, a sample count,
loaded weights equal to the live model's, or the PlanError an unsupported cell must raise),
and only then records the cells it proved with ``record``. ``scripts/compatibility.py`` runs the
conformance tests with ``MESHPLAN_MATRIX_LOG`` set and writes docs/compatibility.md from what
they recorded, so the table shows exactly what passed.
"""

from __future__ import annotations

import json
import os

WORKS = "works"


def refused(reason: str) -> str:
    """The outcome of a cell that raises meshplan.PlanError on purpose; ``reason`` is a few words."""
    return f"refused: {reason}"


def record(front_end: str, layout: str, cells: dict[str, str]) -> None:
    """Appends proven cells (API -> WORKS or refused(...)) to $MESHPLAN_MATRIX_LOG, when it is set.

    Call it after the test's assertions, from the pytest process (not from a worker).
    """
    path = os.environ.get("MESHPLAN_MATRIX_LOG")
    if not path:
        return
    for api, outcome in cells.items():
        if outcome != WORKS and not outcome.startswith("refused: "):
            raise ValueError(f"cell {front_end}/{layout}/{api} has outcome {outcome!r}; use WORKS or refused(...)")
    with open(path, "a") as log:
        log.write(json.dumps({"front_end": front_end, "layout": layout, "cells": cells}) + "\n")
