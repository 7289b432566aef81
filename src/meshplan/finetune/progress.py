"""What a newcomer sees while ``meshplan finetune`` runs: meshplan's own lines and one progress bar.

Rank 0 of the workers reports its progress as JSON lines on a pipe the launcher hands it
(``MESHPLAN_PROGRESS_FD``); the launcher draws the bar: steps done of the total, the global loss
and samples per second. Everything else the workers print (the engines' start-up lines, their
warnings, Lightning's tips) goes to a log file in the output directory, or, with ``--verbose``,
to the console as well.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any, TextIO

PROGRESS_FD = "MESHPLAN_PROGRESS_FD"


class ProgressReporter:
    """A worker's side: rank 0 writes events to the launcher's pipe; other ranks and plain runs write nothing."""

    def __init__(self) -> None:
        descriptor = os.environ.pop(PROGRESS_FD, None)  # not for this worker's own children
        self._stream: TextIO | None = None
        if descriptor and int(os.environ.get("RANK", "0")) == 0:
            # A data loader's worker processes must not keep the pipe open after this process exits.
            os.set_inheritable(int(descriptor), False)
            self._stream = os.fdopen(int(descriptor), "w", buffering=1, closefd=False)

    def stage(self, text: str) -> None:
        """A line for the console, such as "measuring held-out accuracy"."""
        self._send({"stage": text})

    def start(self, step: int) -> None:
        """Training starts (or, after a restart, goes on) from optimizer step ``step``."""
        self._send({"start": step})

    def step(self, step: int, loss: float, samples_per_second: float) -> None:
        """Optimizer step ``step`` (counted from 1) is done; ``loss`` is the global batch's."""
        self._send({"step": step, "loss": loss, "samples_per_second": samples_per_second})

    def _send(self, event: dict[str, Any]) -> None:
        if self._stream is None:
            return
        try:
            self._stream.write(json.dumps(event) + "\n")
        except OSError:
            self._stream = None  # the launcher is gone; training goes on without a console


# Seconds ProgressDisplay.say waits for the bar's lock before it prints anyway.
_SAY_WAIT_SECONDS = 2.0


class ProgressDisplay:
    """The launcher's side: reads the workers' events from a pipe and draws them on standard error.

    Use as a context manager; ``descriptor`` is the pipe's write end, to pass to the workers
    (``pass_fds``) with its number in ``MESHPLAN_PROGRESS_FD``. The launcher's own messages go
    through ``say``, so that they never land in the middle of the bar's line.
    """

    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self._stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._bar: Any = None
        self._read_end, self.descriptor = os.pipe()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> "ProgressDisplay":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.descriptor)  # the reader sees the end of the pipe once the workers' copies are closed too
        self._thread.join(timeout=5)
        with self._lock:
            self._close_bar()

    def say(self, text: str) -> None:
        """Prints one of the launcher's lines above the bar.

        Waits a little for the bar to finish drawing, never more: the launcher says what it is doing
        while it stops the workers, and a bar stuck on a console that stopped reading must not hold that up.
        """
        locked = self._lock.acquire(timeout=_SAY_WAIT_SECONDS)
        try:
            self._print(text)
        finally:
            if locked:
                self._lock.release()

    def _read(self) -> None:
        with os.fdopen(self._read_end, "r") as events:
            for line in events:
                try:
                    event = json.loads(line)
                    with self._lock:
                        self._show(event)
                except (ValueError, TypeError, KeyError):
                    continue  # a torn line from a worker that died mid-write
                except OSError:
                    return  # the console is gone (a closed pipe): stop drawing, rank 0 stops reporting

    def _show(self, event: dict[str, Any]) -> None:
        if "stage" in event:
            if self._bar is not None and self._bar.n >= self.total_steps:
                self._close_bar()  # training is done: leave its last line, and print below it
            self._print(f"meshplan finetune: {event['stage']}")
        elif "start" in event:
            self._close_bar()  # a restarted attempt: a new bar from the step its checkpoint holds
            self._new_bar(int(event["start"]))
        else:
            bar = self._bar or self._new_bar(int(event["step"]) - 1)
            bar.set_postfix_str(f"loss {float(event['loss']):.4f}, {float(event['samples_per_second']):.1f} samples/s",
                                refresh=False)
            bar.update(int(event["step"]) - bar.n)

    def _new_bar(self, initial: int) -> Any:
        from tqdm.auto import tqdm

        # Starting at the step training starts from keeps tqdm's rate and remaining time true after a resume.
        self._bar = tqdm(total=self.total_steps, initial=initial, file=self._stream, dynamic_ncols=True, mininterval=0,
                         desc="training", bar_format="{desc}: {n}/{total} steps |{bar}|{postfix} [{elapsed}<{remaining}]")
        return self._bar

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _print(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self._stream)
        else:
            print(text, file=self._stream, flush=True)
