"""Where `meshplan finetune` may write: checked before any data is loaded or any worker starts.

A run writes into its ``--output`` directory: job.json, the log, metrics.json, the model
(``save_pretrained``), ``checkpoints/`` and ``trainer/``. It may do so in a new or empty
directory, in the output of an earlier run (recognised by the job.json that run wrote: the new
run goes on from its checkpoints), or, with ``--overwrite``, in any other directory. Even then
it deletes nothing it did not create: a directory holding files that saving the model would
delete is refused.

This module imports neither transformers nor datasets, so the CLI can check ``--output``
before it loads the models and the data.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

from meshplan._compat.transformers import deleted_by_save_pretrained
from meshplan.errors import shown
from meshplan.finetune.errors import FinetuneError

JOB_FILE = "job.json"
JOB_FORMAT = "meshplan-finetune-job"  # the "format" of every job.json meshplan writes
LOG_NAME = "meshplan-finetune.log"
# A run only appends to its log: a directory holding nothing else loses nothing.
APPENDED_ONLY = frozenset({LOG_NAME})
MAX_JOB_FILE = 1 << 20  # a job.json is a few hundred bytes; anything far larger is not one
_SHOWN_NAMES = 3


def check_output(output: str, *, overwrite: bool = False) -> Path:
    """The directory ``--output`` names, resolved; a FinetuneError (one line) when a run must not write there.

    Accepted: a path that does not exist yet (its nearest existing folder writable), an empty
    directory, a previous run's output, or with ``overwrite`` any other writable directory.
    Refused: a file or other non-directory, a link that leads nowhere, a directory that cannot
    be written, a directory holding a symbolic link (a run would write through it), and (unless
    ``overwrite``) a non-empty directory that is not a previous run's output.
    """
    given = Path(output)
    try:
        directory = given.resolve()
    except (OSError, RuntimeError) as error:  # RuntimeError: a loop of symbolic links (Python 3.11/3.12)
        raise FinetuneError(f"--output {shown(output)} cannot be resolved ({_reason(error)}); choose another directory.") from None
    if not directory.exists():
        _check_creatable(given, output)
        return directory
    if not directory.is_dir():
        raise FinetuneError(f"--output {shown(output)} is not a directory; choose a new or empty directory.")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise FinetuneError(f"--output {shown(output)} is a directory this user cannot write to; choose another.")
    try:
        names = sorted(entry.name for entry in os.scandir(directory))
    except OSError as error:
        raise FinetuneError(f"--output {shown(output)} cannot be read ({_reason(error)}); choose another directory.") from None
    _check_no_links(directory, names, output)
    if not names or set(names) <= APPENDED_ONLY or is_job_file(directory / JOB_FILE):
        return directory
    if not overwrite:
        listed = ", ".join(shown(name) for name in names[:_SHOWN_NAMES]) + (", ..." if len(names) > _SHOWN_NAMES else "")
        raise FinetuneError(
            f"--output {shown(output)} is a non-empty directory that no earlier meshplan finetune wrote (it holds "
            f"{len(names)} entries: {listed}); choose a new or empty directory, or pass --overwrite to write into it."
        )
    _check_nothing_deleted(directory, names, output)
    return directory


def is_job_file(path: Path) -> bool:
    """Whether ``path`` is a job.json that `meshplan finetune` wrote: a regular file (not a link) holding a job."""
    try:
        # O_NOFOLLOW: a link is not meshplan's; O_NONBLOCK: a FIFO in its place does not hang the check.
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JOB_FILE:
            return False
        with os.fdopen(descriptor, "rb", closefd=False) as file:
            fields = json.loads(file.read(MAX_JOB_FILE + 1))
    except (OSError, ValueError, RecursionError):  # ValueError: not JSON, not UTF-8, an integer too long
        return False
    finally:
        os.close(descriptor)
    return _is_job(fields)


def _is_job(fields: object) -> bool:
    """A job as ``FinetuneJob.to_json`` writes it: its "format" mark (older files lack it) and only the job's fields."""
    from meshplan.finetune.job import FinetuneJob

    if not isinstance(fields, dict):
        return False
    names = {field.name for field in dataclasses.fields(FinetuneJob)}
    required = {field.name for field in dataclasses.fields(FinetuneJob) if field.default is dataclasses.MISSING}
    keys = set(fields) - {"format"}
    return fields.get("format", JOB_FORMAT) == JOB_FORMAT and required <= keys <= names


def _check_creatable(given: Path, output: str) -> None:
    """A directory that does not exist yet: refused when a link leads nowhere or its nearest folder is read-only."""
    absolute = given.absolute()
    nearest = next(path for path in (absolute, *absolute.parents) if os.path.lexists(path))
    if not nearest.exists():  # a link to nothing: creating the directory would create its target, elsewhere
        raise FinetuneError(f"--output {shown(output)} goes through the symbolic link {shown(str(nearest))}, which "
                            f"points to nothing; choose a new or empty directory.")
    if not nearest.is_dir():
        raise FinetuneError(f"--output {shown(output)} cannot be created: {shown(str(nearest))} is not a directory.")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise FinetuneError(f"--output {shown(output)} cannot be created: this user cannot write to {shown(str(nearest))}.")


def _check_no_links(directory: Path, names: list[str], output: str) -> None:
    """meshplan creates no links: one among the files a run writes (job.json, the log, the model's
    config, weights and tokenizer files, which save_pretrained names) would make the run write
    elsewhere, so any link at the top of the directory is refused."""
    links = [name for name in names if (directory / name).is_symlink()]
    if links:
        raise FinetuneError(f"--output {shown(output)} holds a symbolic link {shown(links[0])}; a run writes its files "
                            f"(job.json, metrics.json, the model and tokenizer) there and would write through a link. "
                            f"meshplan creates no links: remove it or choose another directory.")


def _check_nothing_deleted(directory: Path, names: list[str], output: str) -> None:
    """Refuses a directory holding files that saving the model would delete (even with --overwrite)."""
    doomed = [name for name in names if deleted_by_save_pretrained(name) and (directory / name).is_file()]
    if doomed:
        raise FinetuneError(
            f"--output {shown(output)} holds {shown(doomed[0])}, which saving the model would delete (transformers' "
            f"save_pretrained removes the weight shards of an earlier save); move it away or choose another directory."
        )


def _reason(error: BaseException) -> str:
    return getattr(error, "strerror", None) or type(error).__name__
