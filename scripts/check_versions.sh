#!/usr/bin/env bash
# Tests meshplan at the LOWEST versions pyproject.toml declares.
#
#   scripts/check_versions.sh [--venv DIR] [--pin NAME==VERSION]... [-- PYTEST_ARGS...]
#
# 1. Reads [project] dependencies from pyproject.toml and pins each direct dependency to its
#    lower bound: "torch>=2.9" becomes torch==2.9.0 (padded to three parts; PEP 440 ignores
#    trailing zeros, so pyyaml==6.0.0 selects PyYAML 6.0). --pin NAME==VERSION replaces one
#    bound, so a raised bound can be tried without editing pyproject.toml. Transitive
#    dependencies resolve normally.
# 2. Makes a virtual environment in DIR (default: a new temporary folder; never inside the
#    checkout) and installs the checkout into it as the README does (pip install -e ".[dev]"),
#    with the pins as constraints. An existing DIR is reused: pip only changes what differs.
#    Every file pip fetches is kept in a wheelhouse, $MESHPLAN_WHEELHOUSE (default
#    ~/.cache/meshplan-check-versions; about 3.5 GB per torch version tried).
# 3. Prints the installed versions of the direct dependencies (pip freeze).
# 4. Runs the fast tier (pytest -m "not slow"), then one parity spawn: three test ids, DDP,
#    ZeRO-3 and TP, whose shared fixture trains every two-process case of tests/test_parity.py
#    in two workers. Arguments after -- replace both selections and go to pytest as they are,
#    to rerun one failing test in the same DIR.
#
# Exit status: non-zero if the install or either pytest run failed.
#
# Time on 2 shared cores: about 25 minutes the first time (an old torch from PyPI is a CUDA
# build of about 3.5 GB with its nvidia-* packages, which runs on the CPU: 10 minutes to fetch
# and install), 10-15 minutes once the wheelhouse holds the files: 3-5 minutes to resolve and
# install, 1 minute for the fast tier, 3-7 minutes for the parity spawn (DeepSpeed compiles
# its CPU op on first use, into DIR/torch_extensions). Rerunning in the same DIR saves the install.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
PARITY_TESTS=(  # one id per strategy; all three come from the same two-process spawn
    "tests/test_parity.py::test_two_processes_match_one[llama-DDP]"
    "tests/test_parity.py::test_two_processes_match_one[llama-ZeRO-3]"
    "tests/test_parity.py::test_two_processes_match_one[llama-TP-2]"
)

venv=""
pins=()
pytest_args=()
while (($#)); do
    case $1 in
        --venv) venv=$2; shift 2 ;;
        --pin) pins+=("$2"); shift 2 ;;
        --) shift; pytest_args=("$@"); break ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
        *) echo "check_versions.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

venv=$(realpath -m "${venv:-$(mktemp -d -t meshplan-lowest.XXXXXX)}")
case $venv/ in
    "$ROOT"/*) echo "check_versions.sh: the venv must lie outside the checkout, not in $venv" >&2; exit 2 ;;
esac
mkdir -p "$venv"
echo "== venv: $venv"

# The lowest version of each direct dependency, one NAME==VERSION a line.
python3 - "$ROOT/pyproject.toml" "${pins[@]}" >"$venv/lowest.txt" <<'EOF'
import re
import sys
import tomllib


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


overrides = {}
for pin in sys.argv[2:]:
    name, _, version = pin.partition("==")
    if not version:
        sys.exit(f"--pin wants NAME==VERSION, not {pin!r}")
    overrides[canonical(name)] = version
with open(sys.argv[1], "rb") as file:
    dependencies = tomllib.load(file)["project"]["dependencies"]
for dependency in dependencies:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*).*?>=\s*([0-9][0-9.]*)", dependency)
    if not match:
        sys.exit(f"pyproject.toml: {dependency!r} declares no lower bound (name>=version)")
    name, bound = match.groups()
    parts = bound.split(".")
    padded = ".".join(parts + ["0"] * (3 - len(parts)))
    print(f"{name}=={overrides.pop(canonical(name), padded)}")
if overrides:
    sys.exit(f"--pin names no direct dependency: {', '.join(overrides)}")
EOF
echo "== pins:"; cat "$venv/lowest.txt"

# This machine's package index sends no cache headers, so pip's own cache keeps nothing: every
# file is downloaded once into a wheelhouse, and the install reads only from there.
wheelhouse=${MESHPLAN_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/meshplan-check-versions}
SECONDS=0
[[ -x $venv/bin/python ]] || python3 -m venv "$venv"
"$venv/bin/pip" download --progress-bar off -d "$wheelhouse" --find-links "$wheelhouse" -c "$venv/lowest.txt" \
    "$ROOT[dev]" wheel  # wheel: meshplan's build requires it
"$venv/bin/pip" install -q --no-index --find-links "$wheelhouse" -c "$venv/lowest.txt" -e "$ROOT[dev]"
echo "== installed in ${SECONDS}s:"
names=$(cut -d= -f1 "$venv/lowest.txt" | sed 's/[-_.]/[-_.]/g' | paste -sd'|')
"$venv/bin/pip" freeze | grep -iE "^($names)=="

# DeepSpeed's C++ ops are compiled for one torch: keep them apart from other venvs' builds, and
# from this venv's builds for another torch (a rerun with another --pin torch==...).
torch_version=$("$venv/bin/python" -c "import torch; print(torch.__version__)")
export TORCH_EXTENSIONS_DIR=$venv/torch_extensions/torch-$torch_version
cd "$ROOT"
pytest=("$venv/bin/python" -m pytest -p no:cacheprovider)
if ((${#pytest_args[@]})); then
    exec "${pytest[@]}" "${pytest_args[@]}"
fi
status=0
SECONDS=0
"${pytest[@]}" -m "not slow" -q || status=1
echo "== fast tier: ${SECONDS}s"
SECONDS=0
"${pytest[@]}" -q "${PARITY_TESTS[@]}" || status=1
echo "== parity spawn: ${SECONDS}s"
echo "== venv kept in $venv: rerun a test with --venv $venv -- TEST_ID, or remove it (about 6 GB)"
exit $status
