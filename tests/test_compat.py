"""The canaries: every foreign internal meshplan relies on is still there, as it was read.

Each library's internals live in one module of meshplan._compat and are listed in its
INTERNALS; a failure here names the internal, what meshplan uses it for, the version it was
read from and the installed one. No processes, no training.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from meshplan._compat import Internal

LIBRARIES = ["lightning", "accelerate", "deepspeed", "torch", "transformers", "ray", "peft"]
# DeepSpeed's attributes of ZeRO parameters, optimizers and engines, and internals meshplan once
# reached directly and now reaches through a public name (transformers' _tp_plan, Lightning's
# LightningOptimizer._optimizer).
FOREIGN_INTERNAL_NAMES = {
    "ds_id", "ds_shape", "ds_tensor", "ds_process_group", "bit16_groups", "fp16_groups", "sub_group_to_group_id",
    "single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "checkpoint_event_prologue",
    "checkpoint_event_epilogue", "deepspeed_engine_wrapped", "module_forward_pre_hook", "module_forward_post_hook",
    "_tp_plan", "_optimizer", "compute_local_shape_and_global_offset",
}
ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "src" / "meshplan"


def all_internals() -> list[Internal]:
    """Every touch point, from every library's compat module."""
    return [internal for library in LIBRARIES for internal in importlib.import_module(f"meshplan._compat.{library}").INTERNALS]


@pytest.mark.parametrize("internal", all_internals(), ids=lambda internal: f"{internal.library}:{internal.name}")
def test_each_internal_is_still_there_as_read(internal: Internal) -> None:
    internal.verify()


@pytest.mark.parametrize("library", LIBRARIES)
def test_each_compat_module_lists_its_touch_points(library: str) -> None:
    internals = importlib.import_module(f"meshplan._compat.{library}").INTERNALS
    assert internals, library
    assert all(internal.library == library and internal.purpose and internal.read_from for internal in internals)
    names = [internal.name for internal in internals]
    assert len(names) == len(set(names)), f"{library} lists a touch point twice"


def test_no_private_foreign_name_is_reached_outside_compat() -> None:
    private_names = {part for internal in all_internals() for part in re.split(r"[.:(),\s]", internal.name)
                     if part.startswith("_") and not part.startswith("__")}
    assert {"_hp_mapping", "_models", "_validate_device_index_selection"} <= private_names
    # Foreign names without an underscore that are internals all the same, and names already
    # replaced by a public equivalent, so that they do not come back.
    private_names |= FOREIGN_INTERNAL_NAMES
    # meshplan's code and everything that uses it the way a user would: tests, scripts, examples, benchmarks.
    files = [path for folder in ("src/meshplan", "tests", "scripts", "examples", "bench") for path in (ROOT / folder).rglob("*.py")
             if "_compat" not in path.parts and path.name != "test_compat.py"]
    offenders = []
    for path in files:
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {name}" for name in sorted(private_names)
                      if re.search(rf"(?<![\w]){re.escape(name)}(?!\w)", text)]
    assert not offenders, "reach these through meshplan._compat: " + "; ".join(offenders)


def test_a_changed_internal_is_named_with_the_installed_version() -> None:
    def gone() -> None:
        raise AttributeError("no attribute '_hp_mapping'")

    internal = Internal("torch", "Tensor._hp_mapping", "the example", "2.13.0", gone)
    with pytest.raises(AssertionError, match=r"torch \d.* changed an internal .*Tensor\._hp_mapping \(the example; read from torch 2\.13\.0\)"):
        internal.verify()


def test_the_plan_loads_no_engine_and_holds_the_tp_style_names() -> None:
    import subprocess
    import sys

    # meshplan.plan alone, without the package's __init__ (which registers the Lightning strategies):
    # the framework-neutral layout loads neither torch nor any engine, directly or through meshplan.tp.
    code = ("import sys, types\n"
            f"package = types.ModuleType('meshplan'); package.__path__ = [{str(SOURCE)!r}]\n"
            "sys.modules['meshplan'] = package\n"
            "import meshplan.plan\n"
            "print(' '.join(sorted(sys.modules)))\n")
    loaded = subprocess.run([sys.executable, "-B", "-c", code], check=True, capture_output=True, text=True).stdout.split()
    foreign = [name for name in loaded if name.split(".")[0] in ("torch", "lightning", "deepspeed", "accelerate", "transformers")]
    assert "meshplan.plan" in loaded and not foreign, f"meshplan.plan loads {', '.join(foreign)}"

    from meshplan.plan import TP_STYLES
    from meshplan.tp.apply import STYLES

    assert list(STYLES) == list(TP_STYLES), "meshplan.tp.apply must realize exactly the Plan's TP styles"
