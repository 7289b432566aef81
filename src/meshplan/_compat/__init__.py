"""The foreign internals meshplan relies on: one module per library, each with its canaries.

Lightning, Accelerate, DeepSpeed, torch and transformers are upgraded on their users'
schedule, and a private name may move in any release. meshplan reaches every private
attribute, private function, copied method body or protocol detail of those libraries only
through ``meshplan._compat.<library>``, where each is wrapped in a small function that says
what it is for and which versions it was read from. Each module lists its touch points in
``INTERNALS``: a canary per touch point, checked without processes or training
(tests/test_compat.py), that fails with a message naming the internal and the installed
version when it disappears or changes shape.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import textwrap
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Internal:
    """One foreign internal meshplan touches, and how to tell it is still there as read.

    Attributes:
        library: the distribution that owns it (``"lightning"``, ``"accelerate"``, ``"deepspeed"``,
            ``"torch"``, ``"transformers"``).
        name: the dotted name, as a reader would grep for it.
        purpose: one line: what meshplan uses it for.
        read_from: the versions it was read from (``"2.6.6"``).
        check: raises ``AssertionError`` (or any exception) with a reason when it has changed;
            cheap: no processes, no training, no network.
    """

    library: str
    name: str
    purpose: str
    read_from: str
    check: Callable[[], None]

    def verify(self) -> None:
        """Runs the check; a failure names the internal, its purpose and the installed version."""
        try:
            self.check()
        except Exception as error:  # the canary's whole point is to name any failure
            raise AssertionError(
                f"{self.library} {installed_version(self.library)} changed an internal meshplan relies on: "
                f"{self.name} ({self.purpose}; read from {self.library} {self.read_from}): {error}"
            ) from error


def installed_version(distribution: str) -> str:
    """The installed version of a distribution, or ``"not installed"``."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_fingerprint(function: Callable[..., object]) -> str:
    """A short hash of a function's source, dedented, to notice when a copied upstream body changes."""
    source = textwrap.dedent(inspect.getsource(function))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def require_attributes(owner: object, *names: str) -> None:
    """Asserts that ``owner`` (a class, module or object) still has every attribute in ``names``."""
    missing = [name for name in names if not hasattr(owner, name)]
    assert not missing, f"{getattr(owner, '__qualname__', owner)!r} no longer has {', '.join(missing)}"


def require_parameters(function: Callable[..., object], *names: str) -> None:
    """Asserts that ``function`` still accepts parameters named ``names``."""
    parameters = inspect.signature(function).parameters
    missing = [name for name in names if name not in parameters]
    assert not missing, f"{getattr(function, '__qualname__', function)} no longer takes {', '.join(missing)}"


def require_source(owner: object, *snippets: str) -> None:
    """Asserts that the source of ``owner`` (a function, class or module) still contains every snippet:
    for a protocol detail (an environment variable read, a dict key written) that no signature shows."""
    source = inspect.getsource(owner)
    missing = [snippet for snippet in snippets if snippet not in source]
    name = getattr(owner, "__qualname__", getattr(owner, "__name__", owner))
    assert not missing, f"{name} no longer contains {', '.join(missing)}"
