"""Checkpoints from elsewhere: meshplan trusts none of a checkpoint's bytes (issue 16).

A real checkpoint of a tiny Llama (tied embeddings, so its manifest has an alias) with AdamW
after one step is written in this process. Each test alters a copy as an attacker or a torn
disk would: meshplan must refuse it with a one-line CheckpointError that names the entry, read
nothing outside the checkpoint folder, allocate nothing the files do not hold, and never hang.
What state.pt and rank-*.pt hold is crafted too (torch.save of plain data): the Lightning and
Accelerate loaders, run in this process as a Trainer or a script calls them, must refuse it
before anything is loaded. A seeded fuzz test then mutates manifests, headers, files and the
state files' contents at random.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import json
import os
import pickle
import random
import shutil
import signal
import struct
import time
import warnings
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning
import lightning.pytorch as pl
import numpy
import pytest
import torch
from lightning.pytorch.trainer.states import TrainerFn
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

import meshplan
from meshplan.checkpoint import CheckpointError, CheckpointReader, export, latest_checkpoint, load_training_state
from meshplan.checkpoint import save_training_state
from meshplan.checkpoint.accelerate_state import _iteration
from meshplan.checkpoint.lightning_state import check_lightning_state
from meshplan.checkpoint.manifest import MANIFEST
from meshplan.checkpoint.random_state import random_states, saved_random_states, set_random_states
from meshplan.checkpoint.state_checks import count_problem, like_problem, scaler_problem
from meshplan.checkpoint.store import delete_checkpoint, plain_data
from meshplan.checkpoint.tensor_files import TensorFileReader, TensorFileWriter
from meshplan.cli import main
from meshplan.errors import shown

TENSORS = "tensors-00000-of-00001.safetensors"
EMBED = "model/model.embed_tokens.weight"
NORM = "model/model.norm.weight"  # 32 float32 values: 128 bytes
TIED = "model/lm_head.weight"  # an alias of EMBED
PATTERN = bytes([0xA5, 0x5A, 0xC3, 0x3C]) * 4  # fills every data byte of the sentinel outside the checkpoint
SECRET_SIZE = 123457  # the size of a file outside the checkpoint that no message may reveal
FUZZ_CASES = 1000
FUZZ_SEED = 16
RANK_FILE = "rank-00000.pt"
LOOPS = ("fit_loop", "validate_loop", "test_loop", "predict_loop")
COUNTERS = {"global_steps": 1, "global_samples": 2, "micro_steps": 1, "skipped_steps": 0}
# Lightning's own state as Lightning saves it (the parts that are not tensors).
LIGHTNING_STATE = {"epoch": 0, "global_step": 1, "pytorch-lightning_version": lightning.__version__,
                   "loops": {loop: {"state_dict": {}} for loop in LOOPS}, "callbacks": {"ModelCheckpoint{}": {"best_k_models": {}}},
                   "lr_schedulers": [{"base_lrs": [1e-3], "last_epoch": 1}], "meshplan_deepspeed_counters": COUNTERS}


class Hung(BaseException):
    """Raised by the deadline; a BaseException, so code that catches OSError cannot swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Fails what runs inside if it takes longer than ``seconds`` (a blocked open of a FIFO, say).

    pytest-timeout may have its own timer running: it is put back afterwards.
    """
    def hang(signum: int, frame: Any) -> None:
        raise Hung(f"still running after {seconds} s")

    previous_handler = signal.signal(signal.SIGALRM, hang)
    previous_delay, previous_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous_handler)
        if previous_delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(previous_delay - (time.monotonic() - started), 0.01), previous_interval)


# ---------------------------------------------------------------- a real checkpoint, and files outside it


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64,
                                        tie_word_embeddings=True))


def _trained(scheduler: bool = False) -> tuple[LlamaForCausalLM, torch.optim.Optimizer]:
    model = _tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if scheduler:
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    tokens = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _save(path: Path, scheduler: bool = False) -> Path:
    model, optimizer = _trained(scheduler)
    return save_training_state(path, {"model": model}, {"optimizer": optimizer}, LIGHTNING_STATE,
                               rank_state=random_states(), manifest={"front_end": "test", "step": 1})


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkpoint every test copies; never altered."""
    return _save(tmp_path_factory.mktemp("pristine") / "step=1.ckpt")


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory, pristine: Path) -> Path:
    """A folder outside every checkpoint: ``sentinel.safetensors`` has the checkpoint's own header (and
    size) but every data byte from PATTERN; ``secret`` has SECRET_SIZE bytes."""
    folder = tmp_path_factory.mktemp("outside")
    raw = (pristine / TENSORS).read_bytes()
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]
    data_length = len(raw) - data_start
    pattern = (PATTERN * (data_length // len(PATTERN) + 1))[:data_length]
    (folder / "sentinel.safetensors").write_bytes(raw[:data_start] + pattern)
    assert (folder / "sentinel.safetensors").stat().st_size == (pristine / TENSORS).stat().st_size
    (folder / "secret").write_bytes(b"s" * SECRET_SIZE)
    return folder


@pytest.fixture
def checkpoint(pristine: Path, tmp_path: Path) -> Path:
    """A copy of the pristine checkpoint for one test to alter."""
    path = tmp_path / "step=1.ckpt"
    shutil.copytree(pristine, path)
    return path


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((path / MANIFEST).read_text())


def _edit_manifest(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    manifest = _manifest(path)
    edit(manifest)
    (path / MANIFEST).write_text(json.dumps(manifest))


def _resize(path: Path, name: str) -> None:
    """Makes the manifest agree with the size a file now has, as a careful attacker would."""
    size = os.lstat(path / name).st_size
    _edit_manifest(path, lambda manifest: manifest["files"].__setitem__(name, size))


def _read_tensor_file(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def _write_tensor_file(path: Path, header: Any, data: bytes) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def _edit_header(path: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    header, data = _read_tensor_file(path / TENSORS)
    edited = edit(header)
    _write_tensor_file(path / TENSORS, header if edited is None else edited, data)
    _resize(path, TENSORS)


def _refused(path: Path, *fragments: str) -> str:
    """The one-line CheckpointError opening ``path`` raises; it names the checkpoint and each fragment."""
    with _deadline(10), pytest.raises(CheckpointError) as raised:
        CheckpointReader(path)
    message = str(raised.value)
    assert "\n" not in message and str(path) in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _export_refused(path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *fragments: str) -> None:
    """``meshplan export`` of ``path``: exit code 2, one line on stderr, no output directory left."""
    out = tmp_path / "exported"
    with _deadline(10):
        assert main(["export", str(path), str(out)]) == 2
    error = capsys.readouterr().err
    assert len(error.splitlines()) == 1 and error.startswith("meshplan export: "), error
    for fragment in fragments:
        assert fragment in error, error
    assert not out.exists() and not list(tmp_path.glob(".exported*"))


def _data_bounds(path: Path, key: str) -> list[int]:
    header, _ = _read_tensor_file(path / TENSORS)
    return header[key]["data_offsets"]


# ---------------------------------------------------------------- 1. nothing read outside the checkpoint


@pytest.mark.parametrize("where", ["absolute path", "parent path", "file not in files"])
def test_tensor_map_names_only_files_the_manifest_lists(where: str, checkpoint: Path, outside: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copy(outside / "sentinel.safetensors", checkpoint / "unlisted.safetensors")
    target = {"absolute path": str(outside / "sentinel.safetensors"),
              "parent path": os.path.relpath(outside / "sentinel.safetensors", checkpoint),
              "file not in files": "unlisted.safetensors"}[where]
    _edit_manifest(checkpoint, lambda manifest: manifest["tensors"].__setitem__(EMBED, target))
    _refused(checkpoint, f"tensors['{EMBED}']", "not a file of the manifest's files")
    _export_refused(checkpoint, tmp_path, capsys, f"tensors['{EMBED}']")


@pytest.mark.parametrize("name", ["/etc/passwd", "../step=0.ckpt/state.pt", "..", ".", "", "sub/state.pt",
                                  "sub\\state.pt", "state.pt\0"])
def test_files_lists_only_plain_names_inside_the_checkpoint(name: str, checkpoint: Path) -> None:
    _edit_manifest(checkpoint, lambda manifest: manifest["files"].__setitem__(name, 10))
    _refused(checkpoint, f"manifest entry files[{name!r}]", "is not a plain file name inside the checkpoint")


def test_a_tensor_file_that_is_a_link_is_refused_without_following_it(checkpoint: Path, outside: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    (checkpoint / TENSORS).unlink()
    (checkpoint / TENSORS).symlink_to(outside / "sentinel.safetensors")  # of the very size the manifest says
    _refused(checkpoint, TENSORS, "is a symbolic link")
    _export_refused(checkpoint, tmp_path, capsys, "is a symbolic link")


def test_a_listed_link_is_never_stat_ed_through(checkpoint: Path, outside: Path) -> None:
    (checkpoint / "state.pt").unlink()
    (checkpoint / "state.pt").symlink_to(outside / "secret")
    message = _refused(checkpoint, "state.pt is a symbolic link")
    assert str(SECRET_SIZE) not in message and "bytes" not in message


@pytest.mark.parametrize("swap", ["link", "regular file of the same size"])
def test_a_tensor_file_swapped_after_the_checks_is_never_read(swap: str, checkpoint: Path, outside: Path) -> None:
    # The reader keeps the descriptor whose header it checked: a file put in its place under the
    # same name (even one of the same size, with the same header) is never read.
    with CheckpointReader(checkpoint) as reader:
        expected = _file_contents(checkpoint, reader.manifest)
        (checkpoint / TENSORS).unlink()
        if swap == "link":
            (checkpoint / TENSORS).symlink_to(outside / "sentinel.safetensors")
        else:
            shutil.copyfile(outside / "sentinel.safetensors", checkpoint / TENSORS)
        (checkpoint / "state.pt").unlink()
        (checkpoint / "state.pt").symlink_to(outside / "secret")
        assert _same(reader.tensor(EMBED), expected[EMBED]) and _same(reader.tensor(NORM), expected[NORM])
        assert _same(reader.slice(EMBED, (slice(0, 2),)), expected[EMBED][:2])
        with pytest.raises(CheckpointError, match="symbolic link, never followed"):
            reader.state()


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_tensor_files_are_closed_when_the_reader_is(checkpoint: Path, tmp_path: Path) -> None:
    before = _open_descriptors()
    with CheckpointReader(checkpoint) as reader:
        reader.slice(EMBED, (slice(0, 2),))
        assert _open_descriptors() == before + 1  # one per tensor file
    assert _open_descriptors() == before
    with pytest.raises(CheckpointError, match=f"tensor file {TENSORS} was closed"):
        reader.tensor(EMBED)
    assert reader.state()["global_step"] == 1  # the state files are opened when read
    export(checkpoint, tmp_path / "exported")
    model = _tiny_llama()
    load_training_state(checkpoint, {"model": model}, {"optimizer": torch.optim.AdamW(model.parameters())})
    assert latest_checkpoint(checkpoint.parent) == str(checkpoint)
    assert _open_descriptors() == before


def test_a_checkpoint_reached_through_a_link_the_user_gave_is_read(checkpoint: Path, tmp_path: Path) -> None:
    link = tmp_path / "latest"
    link.symlink_to(checkpoint)
    assert torch.equal(CheckpointReader(link).tensor(EMBED), CheckpointReader(checkpoint).tensor(EMBED))


def test_slices_match_the_whole_tensor(checkpoint: Path) -> None:
    reader = CheckpointReader(checkpoint)
    whole = reader.tensor(EMBED)
    assert torch.equal(reader.slice(EMBED, (slice(3, 9), slice(8, 24))), whole[3:9, 8:24])
    assert torch.equal(reader.slice(EMBED, (slice(0, 64),)), whole)


def test_an_alias_may_not_name_a_tensor_the_checkpoint_stores(checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    # Export would write both under one name: a header whose second entry overwrites the first.
    _edit_manifest(checkpoint, lambda manifest: manifest["aliases"].__setitem__(NORM, EMBED))
    _refused(checkpoint, f"aliases['{NORM}'] names a tensor the checkpoint stores itself")
    _export_refused(checkpoint, tmp_path, capsys, f"aliases['{NORM}']")


def test_a_tensor_file_is_never_written_with_one_name_twice(tmp_path: Path) -> None:
    specs = [("a", (2,), torch.float32), ("b", (1,), torch.float32), ("a", (3,), torch.float32)]
    with pytest.raises(CheckpointError, match="out.safetensors: tensor a would be written twice"):
        TensorFileWriter(tmp_path / "out.safetensors", specs)
    assert not (tmp_path / "out.safetensors").exists()


def test_a_tensor_file_writer_that_fails_closes_its_file(tmp_path: Path) -> None:
    writer = TensorFileWriter(tmp_path / "out.safetensors", [("a", (2,), torch.float32), ("b", (1,), torch.float32)])
    with pytest.raises(CheckpointError, match="expected"):
        writer.write("b", torch.zeros(1))  # out of order: refused
    assert writer._file.closed
    writer = TensorFileWriter(tmp_path / "other.safetensors", [("a", (2,), torch.float32)])
    with pytest.raises(CheckpointError, match="1 tensors were never written"):
        writer.close()
    assert writer._file.closed


@pytest.mark.parametrize("target", ["model/no-such-tensor", f"../other.ckpt/{EMBED}", TENSORS, 3, None])
def test_aliases_name_only_tensors_of_the_same_checkpoint(target: Any, checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _edit_manifest(checkpoint, lambda manifest: manifest["aliases"].__setitem__(TIED, target))
    _refused(checkpoint, f"aliases['{TIED}']", "not a tensor of this checkpoint")
    _export_refused(checkpoint, tmp_path, capsys, f"aliases['{TIED}']")


def test_optimizer_params_name_only_tensors_of_the_checkpoint(checkpoint: Path) -> None:
    _edit_manifest(checkpoint, lambda manifest: manifest["optimizers"]["optimizer"][0]["params"].append("../x"))
    _refused(checkpoint, "optimizers['optimizer'][0]['params']", "'../x', not a tensor of this checkpoint")


# ---------------------------------------------------------------- 2 and 3. headers as strict as safetensors'


def test_an_empty_data_range_with_a_shape_is_refused_not_exported_as_heap(checkpoint: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    _edit_header(checkpoint, lambda header: header[NORM].update(shape=[100000], data_offsets=[0, 0]))
    _refused(checkpoint, f"tensor '{NORM}' of shape [100000] and dtype F32 does not fill its 0 bytes")
    _export_refused(checkpoint, tmp_path, capsys, NORM)


def test_a_tensor_of_no_elements_reads_as_an_empty_tensor(checkpoint: Path) -> None:
    _, data = _read_tensor_file(checkpoint / TENSORS)
    _edit_header(checkpoint, lambda header: header.update(
        {"model/empty": {"dtype": "F32", "shape": [0, 32], "data_offsets": [len(data), len(data)]}}))
    _edit_manifest(checkpoint, lambda manifest: manifest["tensors"].update({"model/empty": TENSORS}))
    assert CheckpointReader(checkpoint).tensor("model/empty").shape == (0, 32)


def _set_entry(key: str, **fields: Any) -> Callable[[dict[str, Any]], None]:
    return lambda header: header[key].update(fields)


HEADER_CASES = {
    "negative start": (_set_entry(NORM, data_offsets=[-8, 120]), "data_offsets [-8, 120], not [start, end]"),
    "start after end": (_set_entry(NORM, data_offsets=[128, 0]), "data_offsets [128, 0], not [start, end]"),
    "end past the data": (_set_entry(NORM, data_offsets=[0, 10**9]), "not [start, end] with 0 <= start <= end <="),
    "shape not matching the bytes": (_set_entry(NORM, shape=[31]), "of shape [31] and dtype F32 does not fill its 128 bytes"),
    "huge shape": (_set_entry(NORM, shape=[2**40, 2**40]), "does not fill its 128 bytes"),
    "huge shape, no bytes": (_set_entry(NORM, shape=[2**62, 2**62], data_offsets=[0, 0]), "does not fill its 0 bytes"),
    "unknown dtype": (_set_entry(NORM, dtype="C64"), "has dtype 'C64', not one of F64"),
    "dtype not a string": (_set_entry(NORM, dtype=["F32"]), "has dtype ['F32']"),
    "bool in shape": (_set_entry(NORM, shape=[True, 32]), "has shape [True, 32], not a list of non-negative integers"),
    "float in shape": (_set_entry(NORM, shape=[32.0]), "has shape [32.0]"),
    "negative size in shape": (_set_entry(NORM, shape=[-32]), "has shape [-32]"),
    "three offsets": (_set_entry(NORM, data_offsets=[0, 64, 128]), "data_offsets [0, 64, 128]"),
    "entry not an object": (lambda header: header.__setitem__(NORM, [1, 2]), f"tensor '{NORM}' is described by [1, 2]"),
    "metadata not strings": (lambda header: header.__setitem__("__metadata__", {"format": 1}), "__metadata__ {'format': 1}"),
    "header a list": (lambda header: [header], "its header is a JSON list, not an object"),
    "overlapping tensors": (lambda header: header.update(copy=dict(header[NORM])), "tensors must be contiguous"),
    "gap": (lambda header: header.__delitem__(NORM), "tensors must be contiguous"),
}


@pytest.mark.parametrize("case", HEADER_CASES)
def test_tensor_headers_are_checked_as_strictly_as_safetensors_does(case: str, checkpoint: Path) -> None:
    edit, fragment = HEADER_CASES[case]
    if case == "gap" and _data_bounds(checkpoint, NORM)[1] == len(_read_tensor_file(checkpoint / TENSORS)[1]):
        pytest.fail("the norm weight must not be the last tensor in the file for this case")
    _edit_header(checkpoint, edit)
    _refused(checkpoint, f"tensor file {TENSORS} is refused", fragment)


def _with_nan(raw: bytes) -> bytes:
    """The file with ``NaN`` (not JSON) in its header and the header length kept right."""
    (length,) = struct.unpack("<Q", raw[:8])
    header = raw[8:8 + length].replace(b'"shape"', b'"x":NaN,"shape"', 1)
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + raw[8 + length:]


RAW_CASES: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "header length of 2**63": (lambda raw: struct.pack("<Q", 2**63) + raw[8:], "header length 9223372036854775808 exceeds"),
    "header length past the file": (lambda raw: struct.pack("<Q", len(raw)) + raw[8:], "exceeds"),
    "file of 5 bytes": (lambda raw: raw[:5], "fewer than the 8 of a header length"),
    "header not UTF-8": (lambda raw: raw[:8] + b"\xff" + raw[9:], "its header is not UTF-8 JSON"),
    "NaN in the header": (_with_nan, "its header is not UTF-8 JSON"),
    "data appended": (lambda raw: raw + bytes(8), "its tensors end at data byte"),
}


@pytest.mark.parametrize("case", RAW_CASES)
def test_tensor_file_bytes_are_checked_before_anything_is_allocated(case: str, checkpoint: Path) -> None:
    edit, fragment = RAW_CASES[case]
    (checkpoint / TENSORS).write_bytes(edit((checkpoint / TENSORS).read_bytes()))
    _resize(checkpoint, TENSORS)
    _refused(checkpoint, f"tensor file {TENSORS} is refused", fragment)


def test_a_header_longer_than_safetensors_allows_is_refused(checkpoint: Path) -> None:
    with open(checkpoint / TENSORS, "r+b") as file:
        file.write(struct.pack("<Q", 100_000_001))
        file.truncate(100_000_100)  # sparse: the header length fits in the file
    _resize(checkpoint, TENSORS)
    _refused(checkpoint, "header length 100000001 exceeds 100000000 bytes")


def test_header_refusals_go_through_the_export_command(checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    raw = (checkpoint / TENSORS).read_bytes()
    (checkpoint / TENSORS).write_bytes(struct.pack("<Q", 2**63) + raw[8:])
    _export_refused(checkpoint, tmp_path, capsys, "header length")


@pytest.mark.parametrize("name", [TENSORS, "state.pt", MANIFEST])
def test_a_fifo_in_place_of_a_file_is_refused_without_hanging(name: str, checkpoint: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    size = _manifest(checkpoint)["files"][TENSORS]
    (checkpoint / name).unlink()
    os.mkfifo(checkpoint / name)
    _refused(checkpoint, name, "not a regular file")
    _export_refused(checkpoint, tmp_path, capsys, "not a regular file")
    with _deadline(5), warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert latest_checkpoint(tmp_path) is None
    if name == TENSORS:  # the reader's own open, as if the FIFO appeared after the manifest was checked
        with _deadline(5), pytest.raises(CheckpointError, match="is not a regular file"):
            TensorFileReader(checkpoint, TENSORS, size)


def test_a_directory_in_place_of_a_file_is_refused(checkpoint: Path) -> None:
    (checkpoint / "rank-00000.pt").unlink()
    (checkpoint / "rank-00000.pt").mkdir()
    _refused(checkpoint, "rank-00000.pt is not a regular file")


def test_state_files_load_only_as_uncompressed_torch_archives(checkpoint: Path) -> None:
    state = checkpoint / "state.pt"
    with zipfile.ZipFile(state) as archive:
        records = [(info.filename, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(state, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in records:
            archive.writestr(name, data)
    _resize(checkpoint, "state.pt")
    with pytest.raises(CheckpointError, match="state.pt holds compressed records"):
        CheckpointReader(checkpoint).state()
    state.write_bytes(pickle.dumps({"global_step": 1}))
    _resize(checkpoint, "state.pt")
    with pytest.raises(CheckpointError, match="state.pt is not an archive written by torch.save.*never unpickles"):
        CheckpointReader(checkpoint).state()


def test_state_files_are_read_only_when_listed(checkpoint: Path) -> None:
    _edit_manifest(checkpoint, lambda manifest: [manifest["files"].pop(name) for name in ("state.pt", "rank-00000.pt")])
    reader = CheckpointReader(checkpoint)
    with pytest.raises(CheckpointError, match="holds no state.pt"):
        reader.state()
    assert reader.rank_state(0) is None


# ---------------------------------------------------------------- 4. latest_checkpoint skips what it cannot read

BROKEN_MANIFESTS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "no-saved-at": lambda manifest: manifest.pop("saved_at"),
    "no-files": lambda manifest: manifest.pop("files"),
    "files-as-a-list": lambda manifest: manifest.__setitem__("files", list(manifest["files"])),
    "step-as-a-string": lambda manifest: manifest.__setitem__("step", "9"),
    "step-as-a-float": lambda manifest: manifest.__setitem__("step", 9.5),
    "step-as-a-bool": lambda manifest: manifest.__setitem__("step", True),
    "saved-at-nan": lambda manifest: manifest.__setitem__("saved_at", float("nan")),
    "tensors-as-a-list": lambda manifest: manifest.__setitem__("tensors", list(manifest["tensors"])),
    "size-as-a-string": lambda manifest: manifest["files"].__setitem__("state.pt", "1261"),
    "models-as-a-string": lambda manifest: manifest.__setitem__("models", "llama"),
    "version-true": lambda manifest: manifest.__setitem__("version", True),
}


def test_latest_checkpoint_skips_what_it_cannot_read_and_says_why(pristine: Path, tmp_path: Path) -> None:
    shutil.copytree(pristine, tmp_path / "step=1.ckpt")
    broken = []
    for label, edit in BROKEN_MANIFESTS.items():  # all of them newer than the good one
        path = tmp_path / f"step=9-{label}.ckpt"
        shutil.copytree(pristine, path)
        _edit_manifest(path, lambda manifest: (manifest.__setitem__("step", 9), edit(manifest)))
        broken.append(path)
    header_broken = tmp_path / "step=9-header.ckpt"
    shutil.copytree(pristine, header_broken)
    _edit_manifest(header_broken, lambda manifest: manifest.__setitem__("step", 9))
    _edit_header(header_broken, _set_entry(NORM, dtype="C64"))
    broken.append(header_broken)
    not_a_manifest = tmp_path / "step=9-not-json.ckpt"
    shutil.copytree(pristine, not_a_manifest)
    (not_a_manifest / MANIFEST).write_text("[")
    broken.append(not_a_manifest)
    (tmp_path / "lightning_logs").mkdir()  # no manifest: not a checkpoint, passed over in silence
    shutil.copytree(pristine, tmp_path / ".step=10.ckpt.partial")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert latest_checkpoint(tmp_path) == str(tmp_path / "step=1.ckpt")
    messages = [str(warning.message) for warning in caught]
    assert len(messages) == len(broken), messages
    for path in broken:
        assert sum(f"latest_checkpoint skips {path}: " in message for message in messages) == 1, (path, messages)
    assert all("\n" not in message for message in messages)


def _list_unencodable_name(path: Path) -> None:
    """A file name with a lone surrogate in ``files``: JSON writes it as ``\\ud800``, no filesystem can hold it."""
    _edit_manifest(path, lambda manifest: manifest["files"].__setitem__("\ud800x", 1))
    assert "\\ud800x" in (path / MANIFEST).read_text()


def test_a_file_name_the_filesystem_cannot_hold_is_skipped_by_latest_checkpoint(pristine: Path, tmp_path: Path) -> None:
    shutil.copytree(pristine, tmp_path / "step=1.ckpt")
    newer = tmp_path / "step=9.ckpt"
    shutil.copytree(pristine, newer)
    _edit_manifest(newer, lambda manifest: manifest.__setitem__("step", 9))
    _list_unencodable_name(newer)
    with pytest.warns(UserWarning) as warned:
        assert latest_checkpoint(tmp_path) == str(tmp_path / "step=1.ckpt")
    messages = [str(warning.message) for warning in warned]
    assert len(messages) == 1 and f"latest_checkpoint skips {newer}: " in messages[0] and "\n" not in messages[0], messages
    assert "files['\\ud800x'] is not a plain file name" in messages[0], messages


def test_a_file_name_the_filesystem_cannot_hold_is_refused_by_export(checkpoint: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    _list_unencodable_name(checkpoint)
    _export_refused(checkpoint, tmp_path, capsys, "is not a plain file name")


def test_latest_checkpoint_orders_by_step_then_time(pristine: Path, tmp_path: Path) -> None:
    for name, step, saved_at in (("a", 3, 100.0), ("b", 3, 200), ("c", 2, 900.0)):
        shutil.copytree(pristine, tmp_path / name)
        _edit_manifest(tmp_path / name, lambda manifest: manifest.update(step=step, saved_at=saved_at))
    assert latest_checkpoint(tmp_path) == str(tmp_path / "b")


# ---------------------------------------------------------------- 5. optimizer hyperparameters


def _group(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["optimizers"]["optimizer"][0]["hyperparameters"]


HYPERPARAMETER_CASES: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "params": (lambda m: _group(m).__setitem__("params", [EMBED]), "'params' is the group's parameter list"),
    "string lr": (lambda m: _group(m).__setitem__("lr", "0.1"), "'lr' is '0.1', not a number"),
    "nan lr": (lambda m: _group(m).__setitem__("lr", float("nan")), "'lr' is nan, not a finite number"),
    "huge integer lr": (lambda m: _group(m).__setitem__("lr", 10**400), "not a finite number"),
    "bool lr": (lambda m: _group(m).__setitem__("lr", True), "'lr' is True, not a number"),
    "unknown key with a list": (lambda m: _group(m).__setitem__("momentum_hack", [1.0]),
                                "'momentum_hack' is [1.0], not a plain value, and not one of this optimizer's"),
    "unknown key with a long string": (lambda m: _group(m).__setitem__("note", "x" * 100), "'note' is 'xxx"),
    "negative lr": (lambda m: _group(m).__setitem__("lr", -0.1), "'lr' is -0.1, below 0"),
    "negative eps": (lambda m: _group(m).__setitem__("eps", -1e-8), "'eps' is -1e-08, below 0"),
    "negative weight_decay": (lambda m: _group(m).__setitem__("weight_decay", -1), "'weight_decay' is -1, below 0"),
    "beta of 1": (lambda m: _group(m).__setitem__("betas", [1, 0.999]), "'betas' is [1, 0.999], not in [0, 1)"),
    "negative beta": (lambda m: _group(m).__setitem__("betas", [0.9, -0.5]), "not in [0, 1)"),
    "negative initial_lr": (lambda m: _group(m).__setitem__("initial_lr", -1.0), "'initial_lr' is -1.0, below 0"),
    "three betas": (lambda m: _group(m).__setitem__("betas", [0.9, 0.99, 0.5]), "not a list of 2 values"),
    "string beta": (lambda m: _group(m).__setitem__("betas", ["0.9", 0.999]), "'betas' [0] is '0.9', not a number"),
    "number for a bool": (lambda m: _group(m).__setitem__("amsgrad", 1), "'amsgrad' is 1, not a bool"),
    "null for a number": (lambda m: _group(m).__setitem__("eps", None), "'eps' is None, not a number"),
    "string for a flag": (lambda m: _group(m).__setitem__("foreach", "yes"), "'foreach' is 'yes', not a bool or null"),
    "nan initial_lr": (lambda m: _group(m).__setitem__("initial_lr", float("nan")), "'initial_lr' is nan, not a finite"),
}


@pytest.mark.parametrize("case", HYPERPARAMETER_CASES)
def test_hyperparameters_are_checked_against_the_optimizer_before_anything_is_loaded(case: str, checkpoint: Path) -> None:
    edit, fragment = HYPERPARAMETER_CASES[case]
    _edit_manifest(checkpoint, edit)
    model = _tiny_llama()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(CheckpointError) as raised:
        load_training_state(checkpoint, {"model": model}, {"optimizer": optimizer})
    message = str(raised.value)
    assert "\n" not in message and fragment in message, message
    assert "optimizer 'optimizer' param group 0 hyperparameter" in message, message
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert not optimizer.state and optimizer.param_groups[0]["lr"] == 1e-3


def test_a_checkpoint_with_more_param_groups_is_refused(checkpoint: Path) -> None:
    def add_group(manifest: dict[str, Any]) -> None:
        manifest["optimizers"]["optimizer"].append({"hyperparameters": {"lr": 1.0}, "params": []})
    _edit_manifest(checkpoint, add_group)
    model = _tiny_llama()
    with pytest.raises(CheckpointError, match="optimizer 'optimizer' was saved with 2 param groups; this one has 1"):
        load_training_state(checkpoint, {"model": model}, {"optimizer": torch.optim.AdamW(model.parameters())})


@pytest.mark.parametrize("with_scheduler", [True, False])
def test_a_checkpoint_saved_with_a_scheduler_resumes_with_or_without_one_yet(with_scheduler: bool, tmp_path: Path) -> None:
    # A scheduler adds initial_lr to each param group; a script may create it after loading.
    path = _save(tmp_path / "scheduled.ckpt", scheduler=True)
    assert _group(_manifest(path))["initial_lr"] == 1e-3
    model = _tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.25)
    if with_scheduler:
        torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    load_training_state(path, {"model": model}, {"optimizer": optimizer})
    assert optimizer.param_groups[0]["initial_lr"] == 1e-3 and optimizer.param_groups[0]["lr"] == 5e-4
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_implementation_flags_stay_as_this_run_built_them(checkpoint: Path) -> None:
    # Saved with torch's defaults (foreach None); resumed with foreach=False, or from a run that
    # used fused kernels: how this run computes is its own choice.
    assert _group(_manifest(checkpoint))["foreach"] is None
    _edit_manifest(checkpoint, lambda manifest: _group(manifest).update(fused=True, amsgrad=None, lr=2e-3))
    model = _tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
    load_training_state(checkpoint, {"model": model}, {"optimizer": optimizer})
    group = optimizer.param_groups[0]
    assert group["foreach"] is False and group["fused"] is None and group["amsgrad"] is False and group["lr"] == 2e-3
    _step(model, optimizer)


def test_parameter_names_are_metadata_never_set(checkpoint: Path) -> None:
    # torch 2.6 keeps them in a group built from named_parameters(); this optimizer was not.
    _edit_manifest(checkpoint, lambda manifest: _group(manifest).__setitem__("param_names", ["a", "b"]))
    model = _tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_training_state(checkpoint, {"model": model}, {"optimizer": optimizer})
    assert "param_names" not in optimizer.param_groups[0]
    _step(model, optimizer)


@pytest.mark.parametrize("step", [5, -1, 2.5, "5"])
def test_a_group_step_is_restored_as_a_count(step: Any, checkpoint: Path) -> None:
    # DeepSpeed's FusedAdam keeps one step per group, added at its first step.
    _edit_manifest(checkpoint, lambda manifest: _group(manifest).__setitem__("step", step))
    model = _tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if step != 5:
        with pytest.raises(CheckpointError, match=r"param group 0 hyperparameter 'step' is .*, not a non-negative integer"):
            load_training_state(checkpoint, {"model": model}, {"optimizer": optimizer})
        return
    load_training_state(checkpoint, {"model": model}, {"optimizer": optimizer})
    assert optimizer.param_groups[0]["step"] == 5


def test_hyperparameters_this_torch_lacks_are_skipped_with_one_warning(checkpoint: Path) -> None:
    # A checkpoint written by a newer torch, whose AdamW has more hyperparameters (as 2.13's has
    # decoupled_weight_decay, which older ones lack).
    _edit_manifest(checkpoint, lambda manifest: _group(manifest).update(new_flag=True, new_knob=0.5, mode="fast", unset=None))
    model = _tiny_llama()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning) as warned:
        load_training_state(checkpoint, {"model": model}, {"optimizer": optimizer})
    messages = [str(warning.message) for warning in warned if "hyperparameters" in str(warning.message)]
    assert len(messages) == 1 and all(name in messages[0] for name in ("new_flag", "new_knob", "mode", "unset"))
    assert not {"new_flag", "new_knob", "mode", "unset"} & set(optimizer.param_groups[0])
    _step(model, optimizer)


# ---------------------------------------------------------------- 5b. optimizer state


def _step(model: LlamaForCausalLM, optimizer: torch.optim.Optimizer) -> None:
    """One training step on a tiny input: what a resumed run does next."""
    tokens = torch.randint(0, 64, (1, 4), generator=torch.Generator().manual_seed(2))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)


def _state_keys(manifest: dict[str, Any], name: str) -> list[str]:
    return [key for key in manifest["tensors"] if key.startswith("optimizer/") and key.endswith("/" + name)]


def _drop_state(name: str, every: bool) -> Callable[[dict[str, Any]], None]:
    def drop(manifest: dict[str, Any]) -> None:
        for key in _state_keys(manifest, name)[:None if every else 1]:
            del manifest["tensors"][key]
    return drop


def _set_step(value: float) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        header, data = _read_tensor_file(path / TENSORS)
        start, end = header[f"optimizer/{NORM}/step"]["data_offsets"]
        _write_tensor_file(path / TENSORS, header, data[:start] + struct.pack("<f", value) + data[end:])
        _resize(path, TENSORS)
    return edit


def _add_scalar_state(key: str) -> Callable[[Path], None]:
    """A float32 scalar ``key`` appended to the tensor file and listed in the manifest."""
    def edit(path: Path) -> None:
        header, data = _read_tensor_file(path / TENSORS)
        header[key] = {"dtype": "F32", "shape": [], "data_offsets": [len(data), len(data) + 4]}
        _write_tensor_file(path / TENSORS, header, data + struct.pack("<f", 1.0))
        _resize(path, TENSORS)
        _edit_manifest(path, lambda manifest: manifest["tensors"].__setitem__(key, TENSORS))
    return edit


OPTIMIZER_STATE_CASES: dict[str, tuple[Callable[[Path], Any], bool, str]] = {
    # case: (edit, load into an optimizer that has stepped, what the message says)
    "state of another shape": (lambda path: _edit_header(path, lambda header: header[f"optimizer/{NORM}/exp_avg"].update(
        shape=[8, 4])), False, f"state optimizer/{NORM}/exp_avg has shape [8, 4], larger than its parameter's [32]"),
    # The embedding's state, flattened, given to the norm (and the norm's to the embedding).
    "state larger than its parameter": (lambda path: _edit_header(path, lambda header: header.update({
        f"optimizer/{NORM}/exp_avg": {**header[f"optimizer/{EMBED}/exp_avg"], "shape": [2048]},
        f"optimizer/{EMBED}/exp_avg": header[f"optimizer/{NORM}/exp_avg"],
    })), False, f"state optimizer/{NORM}/exp_avg has shape [2048], larger than its parameter's [32]"),
    "a state name missing for one parameter": (lambda path: _edit_manifest(path, _drop_state("exp_avg", every=False)),
                                               False, "has ['exp_avg_sq', 'step']; every parameter of a group with as many "
                                                      "dimensions has the same"),
    "an extra state name for one parameter": (_add_scalar_state(f"optimizer/{NORM}/hack"), False,
                                              "has state ['exp_avg', 'exp_avg_sq', 'hack', 'step']"),
    "no step, into an optimizer that keeps one": (lambda path: _edit_manifest(path, _drop_state("step", every=True)),
                                                  True, "the stored state has no 'step', which this optimizer keeps"),
    "amsgrad without max_exp_avg_sq": (lambda path: _edit_manifest(path, lambda m: _group(m).__setitem__("amsgrad", True)),
                                       False, "amsgrad is on, but the stored state has no 'max_exp_avg_sq'"),
    "a negative step": (_set_step(-1.0), False, f"state optimizer/{NORM}/step is -1.0, not a step count of at least 0"),
    "a step that is not a scalar": (lambda path: _edit_header(path, lambda header: header.update({
        f"optimizer/{NORM}/step": header[f"optimizer/{NORM}/exp_avg"], f"optimizer/{NORM}/exp_avg": header[f"optimizer/{NORM}/step"],
    })), False, f"state optimizer/{NORM}/step has shape [32], not a scalar's []"),
}


@pytest.mark.parametrize("case", OPTIMIZER_STATE_CASES)
def test_optimizer_state_is_checked_before_anything_is_loaded(case: str, checkpoint: Path) -> None:
    edit, stepped, fragment = OPTIMIZER_STATE_CASES[case]
    edit(checkpoint)
    model, optimizer = _trained() if stepped else (_tiny_llama(), None)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    state_before = {name: sorted(state) for name, state in enumerate(optimizer.state.values())}
    with pytest.raises(CheckpointError) as raised:
        load_training_state(checkpoint, {"model": model}, {"optimizer": optimizer})
    message = str(raised.value)
    assert "\n" not in message and str(checkpoint) in message and "optimizer 'optimizer' param group 0" in message, message
    assert fragment in message, message
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert {name: sorted(state) for name, state in enumerate(optimizer.state.values())} == state_before


@pytest.mark.parametrize("saved_after_a_step", [True, False])
@pytest.mark.parametrize("loaded_into", ["a new optimizer", "one that has stepped"])
def test_optimizer_state_that_fits_loads_and_steps(saved_after_a_step: bool, loaded_into: str, tmp_path: Path) -> None:
    # A checkpoint saved before the first step holds no optimizer state at all: it loads too.
    model, optimizer = _trained() if saved_after_a_step else (_tiny_llama(), None)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = save_training_state(tmp_path / "step.ckpt", {"model": model}, {"optimizer": optimizer}, {})
    model, optimizer = _trained() if loaded_into == "one that has stepped" else (_tiny_llama(), None)
    optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_training_state(path, {"model": model}, {"optimizer": optimizer})
    assert bool(optimizer.state) == (saved_after_a_step or loaded_into == "one that has stepped")
    _step(model, optimizer)


def _adafactors() -> dict[str, Callable[[Any], torch.optim.Optimizer]]:
    """Adafactor as torch and (where installed) transformers make it: state smaller than its
    parameter (row and column statistics), with other state names for vectors than for matrices."""
    makers: dict[str, Callable[[Any], torch.optim.Optimizer]] = {}
    if hasattr(torch.optim, "Adafactor"):
        makers["torch"] = lambda parameters: torch.optim.Adafactor(parameters, lr=1e-2)
    try:
        from transformers.optimization import Adafactor
    except ImportError:
        return makers
    makers["transformers"] = lambda parameters: Adafactor(parameters, lr=1e-3, relative_step=False, scale_parameter=False)
    makers["transformers, relative step"] = lambda parameters: Adafactor(parameters, lr=None)
    return makers


@pytest.mark.parametrize("name", _adafactors())
def test_adafactor_state_resumes_as_the_uninterrupted_run(name: str, tmp_path: Path) -> None:
    make = _adafactors()[name]
    model = _tiny_llama()
    optimizer = make(model.parameters())
    _step(model, optimizer)
    path = save_training_state(tmp_path / "step.ckpt", {"model": model}, {"optimizer": optimizer}, {})
    _step(model, optimizer)  # the uninterrupted run
    resumed = _tiny_llama()
    resumed_optimizer = make(resumed.parameters())
    load_training_state(path, {"model": resumed}, {"optimizer": resumed_optimizer})
    _step(resumed, resumed_optimizer)
    for (key, expected), actual in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(actual, expected), key


# ---------------------------------------------------------------- 6. deleting only what meshplan wrote


def test_delete_checkpoint_deletes_only_folders_meshplan_wrote(pristine: Path, tmp_path: Path) -> None:
    def copy_of(name: str, *extra: str) -> Path:
        path = tmp_path / name
        shutil.copytree(pristine, path)
        for file in extra:
            (path / file).write_text("mine")
        return path

    assert delete_checkpoint(copy_of("step=1.ckpt")) and not (tmp_path / "step=1.ckpt").exists()
    torn = copy_of("torn.ckpt")
    (torn / TENSORS).unlink()
    assert delete_checkpoint(torn) and not torn.exists()
    kept = [copy_of("with-notes.ckpt", "notes.txt")]
    target = copy_of("target.ckpt")
    (tmp_path / "link.ckpt").symlink_to(target)
    kept += [tmp_path / "link.ckpt", target]
    assert not delete_checkpoint(tmp_path / "link.ckpt")
    no_manifest = copy_of("no-manifest.ckpt")
    (no_manifest / MANIFEST).unlink()
    other_format = copy_of("other-format.ckpt")
    (other_format / MANIFEST).write_text(json.dumps({"format": "someone-else"}))
    user = tmp_path / "user"
    user.mkdir()
    (user / "state.pt").write_text("mine")
    (tmp_path / "file.ckpt").write_text("mine")
    kept += [no_manifest, other_format, user, tmp_path / "file.ckpt"]
    for path in kept[:1] + kept[3:]:
        assert not delete_checkpoint(path), path
    assert all(os.path.lexists(path) for path in kept) and (kept[0] / "notes.txt").read_text() == "mine"
    assert not delete_checkpoint(tmp_path / "missing")
    partial = copy_of(".step=2.ckpt.partial")
    (partial / MANIFEST).unlink()
    (tmp_path / ".step=3.ckpt.replaced").mkdir()
    foreign_partial = copy_of(".step=4.ckpt.partial", "notes.txt")
    assert delete_checkpoint(partial) and delete_checkpoint(tmp_path / ".step=3.ckpt.replaced")
    assert not delete_checkpoint(foreign_partial) and (foreign_partial / "notes.txt").exists()


def test_a_leftover_partial_folder_with_user_files_stops_the_save(tmp_path: Path) -> None:
    partial = tmp_path / ".step=2.ckpt.partial"
    partial.mkdir()
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"\.step=2\.ckpt\.partial is in the way of saving .*notes\.txt.*remove it"):
        _save(tmp_path / "step=2.ckpt")
    assert (partial / "notes.txt").read_text() == "mine" and not (tmp_path / "step=2.ckpt").exists()
    (partial / "notes.txt").unlink()
    (partial / TENSORS).write_bytes(b"torn")  # what a save that died leaves: deleted by the next save
    assert _save(tmp_path / "step=2.ckpt").is_dir() and not partial.exists()


def test_saving_over_a_checkpoint_that_holds_user_files_is_refused(pristine: Path, tmp_path: Path) -> None:
    final = tmp_path / "step=1.ckpt"
    shutil.copytree(pristine, final)
    (final / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="notes.txt"):
        _save(final)
    assert (final / "notes.txt").read_text() == "mine"
    (final / "notes.txt").unlink()
    assert _save(final) == final and not (tmp_path / ".step=1.ckpt.replaced").exists()


def test_lightning_remove_checkpoint_keeps_what_is_not_a_checkpoint(pristine: Path, tmp_path: Path) -> None:
    strategy = meshplan.DDP()
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match="meshplan kept .*user.* it is not a meshplan checkpoint"):
        strategy.remove_checkpoint(user)
    assert (user / "notes.txt").read_text() == "mine"
    checkpoint = tmp_path / "step=1.ckpt"
    shutil.copytree(pristine, checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.remove_checkpoint(checkpoint)
        strategy.remove_checkpoint(tmp_path / "already-gone.ckpt")
    assert not checkpoint.exists()


def test_lightning_remove_checkpoint_unlinks_a_link_and_keeps_its_target(pristine: Path, tmp_path: Path) -> None:
    # ModelCheckpoint(save_last="link") makes last.ckpt a link to the newest checkpoint, and removes it to move it.
    strategy = meshplan.DDP()
    target = tmp_path / "step=1.ckpt"
    shutil.copytree(pristine, target)
    (tmp_path / "last.ckpt").symlink_to(target.name)
    (tmp_path / "dangling.ckpt").symlink_to("gone.ckpt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strategy.remove_checkpoint(tmp_path / "last.ckpt")
        strategy.remove_checkpoint(str(tmp_path / "dangling.ckpt"))
    assert not os.path.lexists(tmp_path / "last.ckpt") and not os.path.lexists(tmp_path / "dangling.ckpt")
    assert sorted(path.name for path in target.iterdir()) == sorted(path.name for path in pristine.iterdir())


def test_accelerate_numbering_ignores_names_it_did_not_write() -> None:
    assert _iteration(Path("checkpoint_12")) == 12 and _iteration(Path(".checkpoint_3.replaced")) == 3
    assert _iteration(Path("checkpoint_abc")) == -1 and _iteration(Path("checkpoint_1.5")) == -1


def test_accelerate_total_limit_deletes_only_its_own_checkpoints(pristine: Path, tmp_path: Path) -> None:
    from meshplan._compat.accelerate import reset_process_state
    from accelerate.utils import ProjectConfiguration

    folder = tmp_path / "checkpoints"
    for name in ("checkpoint_0", "checkpoint_1", "checkpoint_abc"):
        shutil.copytree(pristine, folder / name)
    (folder / "checkpoint_0" / "notes.txt").write_text("mine")
    project = ProjectConfiguration(project_dir=str(tmp_path), automatic_checkpoint_naming=True, total_limit=1, iteration=2)
    accelerator = meshplan.accelerator(meshplan.DDP(), project_config=project)  # one process, no launcher
    try:
        with pytest.warns(UserWarning, match="total_limit: meshplan kept .*checkpoint_0"):
            assert accelerator._save_location(None) == folder / "checkpoint_2"
    finally:
        reset_process_state()
    assert sorted(path.name for path in folder.iterdir()) == ["checkpoint_0", "checkpoint_abc"]
    assert (folder / "checkpoint_0" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- 7. what state.pt and rank-*.pt hold


def _edit_state_file(path: Path, name: str, edit: Callable[[Any], Any]) -> None:
    """Rewrites the state file ``name`` with torch.save of plain data, and lists its new size, as an attacker would."""
    data = torch.load(path / name, weights_only=True)
    edited = edit(data)
    torch.save(data if edited is None else edited, path / name)
    _resize(path, name)


def _set(place: str, value: Any) -> Callable[[Any], Any]:
    """An edit that sets ``data[key1][key2]...`` (``place``: keys separated by "/", digits for indexes) to ``value``."""
    keys = [int(key) if key.isdigit() else key for key in place.split("/")]

    def edit(data: Any) -> Any:
        return _replaced(data, keys, value)
    return edit


def _replaced(node: Any, keys: list[Any], value: Any) -> Any:
    """``node`` with the value at ``keys`` replaced (tuples rebuilt), or deleted when ``value`` is DELETE."""
    key, rest = keys[0], keys[1:]
    copied = dict(node) if isinstance(node, dict) else list(node)
    if rest:
        copied[key] = _replaced(node[key], rest, value)
    elif value is DELETE:
        del copied[key]
    else:
        copied[key] = value
    return tuple(copied) if isinstance(node, tuple) else copied


DELETE = object()


@contextlib.contextmanager
def _generators_kept() -> Iterator[None]:
    """Puts this process's random number generators back as they were afterwards."""
    python, numpy_state, cpu = random.getstate(), numpy.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(python)
        numpy.random.set_state(numpy_state)
        torch.set_rng_state(cpu)


def _generators() -> tuple[Any, ...]:
    return random.getstate(), numpy.random.get_state()[1].tolist(), torch.get_rng_state().tolist()


def _refused_state(load: Callable[[Path], Any], path: Path, file: str, *fragments: str) -> str:
    """The one-line CheckpointError ``load(path)`` raises, naming the checkpoint, the file and each fragment."""
    with _deadline(10), pytest.raises(CheckpointError) as raised:
        load(path)
    message = str(raised.value)
    assert "\n" not in message and len(message) < 400 and f"checkpoint {path}: {file}" in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def _bytes_set(start: int, value: bytes) -> Callable[[torch.Tensor], torch.Tensor]:
    def edit(state: torch.Tensor) -> torch.Tensor:
        state = state.clone()
        state[start:start + len(value)] = torch.frombuffer(bytearray(value), dtype=torch.uint8)
        return state
    return edit


# Each case: the edit of rank-00000.pt, and what the message must say.
RANK_CASES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "torch state of floats": (lambda s: _set("torch", s["torch"].float())(s), "entry torch is a cpu torch.float32 tensor"),
    "torch state cut short": (lambda s: _set("torch", s["torch"][:100])(s), "not a CPU torch.uint8 tensor of 5056 bytes"),
    # torch's mt19937 state: seed (8 bytes), left (4), seeded (4), next (8), then the words.
    "torch position past the words": (lambda s: _set("torch", _bytes_set(16, struct.pack("<Q", 10**6))(s["torch"]))(s),
                                      "entry torch is refused by the generator ('Invalid mt19937 state')"),
    "torch state missing": (_set("torch", DELETE), "entry torch is missing"),
    "python version 2": (_set("python/0", 2), "entry python[0] is 2, not 3"),
    "python state of 624 words": (lambda s: _set("python/1", s["python"][1][:624])(s), "...), not 624 32-bit words"),
    "python word of 33 bits": (_set("python/1/0", 2**32), "not 624 32-bit words and a position of at most 624"),
    "python position past the words": (_set("python/1/624", 625), "entry python[1]"),
    "python gauss a string": (_set("python/2", "0.5"), "entry python[2] is '0.5', not a float or None"),
    "python state a string": (_set("python", "x" * 10**6), "entry python is 'xxxxxxx"),
    "numpy another generator": (_set("numpy/0", "PCG64"), "entry numpy[0] is 'PCG64', not 'MT19937'"),
    "numpy keys of int64": (lambda s: _set("numpy/1", s["numpy"][1].long())(s), "entry numpy[1] is a cpu torch.int64 tensor"),
    "numpy position past the keys": (_set("numpy/2", 625), "entry numpy[2] is 625, not a position from 0 to 624"),
    "numpy has_gauss of 2": (_set("numpy/3", 2), "entry numpy[3] is 2, not 0 or 1"),
    "numpy gauss a list": (_set("numpy/4", [0.5]), "entry numpy[4] is [0.5], not a float"),
    "cuda state a list": (_set("cuda", [1, 2]), "entry cuda is [1, 2], not a CPU torch.uint8 tensor"),
    "a list, not a dict": (lambda s: [s], "rank-00000.pt holds list, not the dict meshplan saves"),
}


class _LightningModule(pl.LightningModule):
    """The tiny Llama, as a script's LightningModule."""

    def __init__(self) -> None:
        super().__init__()
        self.model = _tiny_llama()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


@dataclasses.dataclass
class _Lightning:
    strategy: Any
    module: _LightningModule
    saved: Path  # a checkpoint the strategy wrote; never altered

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for name, tensor in self.module.state_dict().items()}


@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> _Lightning:
    """meshplan.DDP as a Trainer sets it up to fit (one process, no process group), and a checkpoint it saved.

    ``strategy.load_checkpoint`` is what ``trainer.fit(ckpt_path=...)`` calls; afterwards the
    module's weights differ from the checkpoint's, so a load that went ahead would show.
    """
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=meshplan.DDP(), logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    module = _LightningModule()
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.state.fn = TrainerFn.FITTING
    trainer.strategy.optimizers = [module.configure_optimizers()]
    state = {**LIGHTNING_STATE, "optimizer_states": [{}], "state_dict": {}}  # the tensors' parts are saved as tensors
    saved = tmp_path_factory.mktemp("lightning") / "last.ckpt"
    trainer.strategy.save_checkpoint(state, saved)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.add_(1.0)
    return _Lightning(trainer.strategy, module, saved)


def test_a_lightning_checkpoint_loads_its_state_and_generators(lightning_run: _Lightning, tmp_path: Path) -> None:
    with _generators_kept():
        state = lightning_run.strategy.load_checkpoint(lightning_run.saved)
        draws = torch.rand(3), random.random(), numpy.random.rand()
        lightning_run.strategy.load_checkpoint(lightning_run.saved)
        assert torch.equal(torch.rand(3), draws[0]) and (random.random(), numpy.random.rand()) == draws[1:]
    assert state["global_step"] == 1 and state["meshplan_deepspeed_counters"] == COUNTERS
    with torch.no_grad():
        for parameter in lightning_run.module.parameters():
            parameter.add_(1.0)


LIGHTNING_CASES: dict[str, tuple[Callable[[Any], Any], str]] = {
    "version not a string": (_set("pytorch-lightning_version", 2.6), "entry pytorch-lightning_version is 2.6, not a str"),
    "version older than 2.0": (_set("pytorch-lightning_version", "1.5.0"),
                               "is '1.5.0', not a Lightning version of at least 2.0.0"),
    "version not a version": (_set("pytorch-lightning_version", "x" * 10**6), "not a Lightning version"),
    "version missing": (_set("pytorch-lightning_version", DELETE), "is None, not a str"),
    "negative global_step": (_set("global_step", -1), "entry global_step is -1, not a non-negative integer"),
    "global_step a string": (_set("global_step", "1"), "entry global_step is '1', not a non-negative integer"),
    "epoch a float": (_set("epoch", 1.5), "entry epoch is 1.5, not a non-negative integer"),
    "epoch a bool": (_set("epoch", True), "entry epoch is True, not a non-negative integer"),
    "epoch a tensor": (_set("epoch", torch.zeros(4, 4)), "entry epoch is a torch.float32 tensor of shape [4, 4], not a non-"),
    "loops a list": (_set("loops", []), "entry loops is [], not a dict"),
    "fit loop missing": (_set("loops/fit_loop", DELETE), "entry loops['fit_loop'] is None, not a dict"),
    "test loop a number": (_set("loops/test_loop", 3), "entry loops['test_loop'] is 3, not a dict"),
    "callback state a number": (_set("callbacks/ModelCheckpoint{}", 5), "entry callbacks['ModelCheckpoint{}'] is 5, not a dict"),
    "callbacks a list": (_set("callbacks", [{}]), "entry callbacks is [{}], not a dict"),
    "schedulers a dict": (_set("lr_schedulers", {}), "entry lr_schedulers is {}, not a list"),
    "scheduler state a string": (_set("lr_schedulers/0", "x"), "entry lr_schedulers[0] is 'x', not a dict"),
    "precision plugin state a list": (_set("Precision", [1]), "entry Precision is [1], not a dict"),
    "counters naming another attribute": (_set("meshplan_deepspeed_counters/optimizer", 0),
                                          "entry meshplan_deepspeed_counters is {"),
    "negative counter": (_set("meshplan_deepspeed_counters/micro_steps", -1),
                         "entry meshplan_deepspeed_counters['micro_steps'] is -1, not a non-negative integer"),
}


@pytest.mark.parametrize("case", LIGHTNING_CASES)
def test_lightning_state_is_checked_before_anything_is_loaded(case: str, lightning_run: _Lightning, tmp_path: Path) -> None:
    edit, fragment = LIGHTNING_CASES[case]
    path = tmp_path / "last.ckpt"
    shutil.copytree(lightning_run.saved, path)
    _edit_state_file(path, "state.pt", edit)
    before, generators = lightning_run.weights(), _generators()
    _refused_state(lightning_run.strategy.load_checkpoint, path, "state.pt entry ", fragment)
    assert all(torch.equal(tensor, before[name]) for name, tensor in lightning_run.module.state_dict().items())
    assert _generators() == generators


@pytest.mark.parametrize("case", RANK_CASES)
def test_generator_states_are_checked_before_anything_is_loaded(case: str, lightning_run: _Lightning, tmp_path: Path) -> None:
    edit, fragment = RANK_CASES[case]
    path = tmp_path / "last.ckpt"
    shutil.copytree(lightning_run.saved, path)
    _edit_state_file(path, RANK_FILE, edit)
    before, generators = lightning_run.weights(), _generators()
    _refused_state(lightning_run.strategy.load_checkpoint, path, RANK_FILE, fragment)
    assert all(torch.equal(tensor, before[name]) for name, tensor in lightning_run.module.state_dict().items())
    assert _generators() == generators


class _Registered:
    """An object a script registers for checkpointing (a counter of its own)."""

    def __init__(self) -> None:
        self.count = 3

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


@dataclasses.dataclass
class _Accelerate:
    accelerator: Any
    model: Any
    scheduler: Any
    registered: _Registered
    saved: Path  # a checkpoint save_state wrote; never altered

    def snapshot(self) -> tuple[Any, ...]:
        return ({name: tensor.clone() for name, tensor in self.model.state_dict().items()}, self.scheduler.state_dict(),
                self.registered.count, self.accelerator.step, _generators())


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Accelerate]:
    """meshplan.accelerator (one process, no launcher) with a model, an AdamW, a LambdaLR and a registered object,
    and a checkpoint its save_state wrote; afterwards the weights, the step and the object's count all differ."""
    from meshplan._compat.accelerate import reset_process_state

    accelerator = meshplan.accelerator(meshplan.DDP())
    try:
        model = _tiny_llama()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        registered = _Registered()
        accelerator.register_for_checkpointing(registered)
        saved = Path(accelerator.save_state(str(tmp_path_factory.mktemp("accelerate") / "checkpoint")))
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.add_(1.0)
        accelerator.step, registered.count = 7, 8
        yield _Accelerate(accelerator, model, scheduler, registered, saved)
    finally:
        reset_process_state()


def test_an_accelerate_checkpoint_loads_its_state(accelerate_run: _Accelerate, tmp_path: Path) -> None:
    with _generators_kept():
        accelerate_run.accelerator.load_state(str(accelerate_run.saved))
    assert accelerate_run.accelerator.step == 0 and accelerate_run.registered.count == 3
    assert accelerate_run.scheduler.state_dict()["_last_lr"] == [5e-4]
    with torch.no_grad():
        for parameter in accelerate_run.model.parameters():
            parameter.add_(1.0)
    accelerate_run.accelerator.step, accelerate_run.registered.count = 7, 8


ACCELERATE_CASES: dict[str, tuple[str, Callable[[Any], Any], str]] = {
    "step missing": ("state.pt", _set("step", DELETE), "state.pt entry step is missing"),
    "negative step": ("state.pt", _set("step", -3), "state.pt entry step is -3, not a non-negative integer"),
    "schedulers a dict": ("state.pt", _set("schedulers", {}), "state.pt entry schedulers is {}, not a list"),
    "scheduler state a list": ("state.pt", _set("schedulers/0", [1]),
                               "entry schedulers[0] is [1], not a dict as the scheduler's is"),
    "scheduler entry it lacks": ("state.pt", _set("schedulers/0/optimizer", [1]),
                                 "entry schedulers[0]['optimizer'] is not an entry the scheduler has"),
    "scheduler lr a string": ("state.pt", _set("schedulers/0/base_lrs/0", "0.1"),
                              "entry schedulers[0]['base_lrs'][0] is '0.1', not a number as the scheduler's is"),
    "scheduler lrs of another count": ("state.pt", _set("schedulers/0/base_lrs", [1e-3, 1e-3]),
                                       "entry schedulers[0]['base_lrs'] is [0.001, 0.001], not a list of 1 values"),
    "scheduler epoch nan": ("state.pt", _set("schedulers/0/last_epoch", float("nan")),
                            "entry schedulers[0]['last_epoch'] is nan, not a finite number"),
    "registered state a number": ("state.pt", _set("custom_objects/0", 5), "entry custom_objects[0] is 5, not a dict"),
    "counters of another name": ("state.pt", _set("deepspeed_counters", {"train_batch_size": 1}),
                                 "entry deepspeed_counters is {'train_batch_size': 1}, not a dict of global_steps"),
    "generator state of another dtype": (RANK_FILE, lambda s: _set("torch", s["torch"].to(torch.int32))(s),
                                         "rank-00000.pt entry torch is a cpu torch.int32 tensor"),
}


@pytest.mark.parametrize("case", ACCELERATE_CASES)
def test_accelerate_state_is_checked_before_anything_is_loaded(case: str, accelerate_run: _Accelerate, tmp_path: Path) -> None:
    file, edit, fragment = ACCELERATE_CASES[case]
    path = tmp_path / "checkpoint"
    shutil.copytree(accelerate_run.saved, path)
    _edit_state_file(path, file, edit)
    before = accelerate_run.snapshot()
    _refused_state(lambda location: accelerate_run.accelerator.load_state(str(location)), path, file, fragment)
    after = accelerate_run.snapshot()
    assert all(torch.equal(tensor, before[0][name]) for name, tensor in after[0].items())
    assert after[1:] == before[1:]


def test_accelerate_scheduler_state_from_another_torch_loads_without_its_plain_scalars(accelerate_run: _Accelerate,
                                                                                        tmp_path: Path) -> None:
    # torch 2.2 to 2.6 stored 'verbose' in every scheduler's state; this torch's schedulers have none.
    path = tmp_path / "checkpoint"
    shutil.copytree(accelerate_run.saved, path)
    _edit_state_file(path, "state.pt", _set("schedulers/0/verbose", False))
    with _generators_kept(), pytest.warns(UserWarning) as warned:
        accelerate_run.accelerator.load_state(str(path))
    messages = [str(warning.message) for warning in warned if "schedulers[0]: verbose" in str(warning.message)]
    assert len(messages) == 1 and "\n" not in messages[0] and str(path) in messages[0], [str(w.message) for w in warned]
    assert "verbose" not in vars(accelerate_run.scheduler) and accelerate_run.scheduler.state_dict()["_last_lr"] == [5e-4]
    with torch.no_grad():
        for parameter in accelerate_run.model.parameters():
            parameter.add_(1.0)
    accelerate_run.accelerator.step, accelerate_run.registered.count = 7, 8


def _step_lr_state() -> dict[str, Any]:
    """A genuine StepLR's state after two steps."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1)
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    return scheduler.state_dict()


def test_lightning_scheduler_state_from_another_torch_loses_only_its_plain_scalars(tmp_path: Path) -> None:
    state = copy.deepcopy(LIGHTNING_STATE)
    state["lr_schedulers"] = [{**_step_lr_state(), "verbose": False}]
    with pytest.warns(UserWarning, match=r"lr_schedulers\[0\]: verbose"):
        check_lightning_state(tmp_path, state, schedulers=[_step_lr_state()])
    assert state["lr_schedulers"] == [_step_lr_state()]


LIGHTNING_SCHEDULER_CASES: dict[str, tuple[Any, str]] = {
    "an entry it lacks that is not a plain value": ({"optimizer": {"lr": 1.0}}, "lr_schedulers[0]['optimizer'] is not an entry"),
    "step size a string": ({"step_size": "1"}, "lr_schedulers[0]['step_size'] is '1', not a number as the scheduler's is"),
    "lrs of another count": ({"base_lrs": [0.1, 0.1]}, "lr_schedulers[0]['base_lrs'] is [0.1, 0.1], not a list of 1 values"),
}


@pytest.mark.parametrize("case", LIGHTNING_SCHEDULER_CASES)
def test_lightning_scheduler_states_are_checked_against_the_live_schedulers(case: str, tmp_path: Path) -> None:
    change, fragment = LIGHTNING_SCHEDULER_CASES[case]
    state = {**LIGHTNING_STATE, "lr_schedulers": [{**_step_lr_state(), **change}]}
    with pytest.raises(CheckpointError) as raised:
        check_lightning_state(tmp_path, state, schedulers=[_step_lr_state()])
    assert "\n" not in str(raised.value) and f"state.pt entry {fragment}" in str(raised.value), str(raised.value)


SCALER_CASES: dict[str, tuple[str, Any, str]] = {
    "scale 0": ("scale", 0.0, "['scale'] is 0.0, not a finite number above 0"),
    "scale infinite": ("scale", float("inf"), "['scale'] is inf, not a finite number"),
    "growth factor 1": ("growth_factor", 1.0, "['growth_factor'] is 1.0, not above 1"),
    "backoff factor 1": ("backoff_factor", 1.0, "['backoff_factor'] is 1.0, not between 0 and 1"),
    "backoff factor 0": ("backoff_factor", 0.0, "['backoff_factor'] is 0.0, not between 0 and 1"),
    "growth interval 0": ("growth_interval", 0, "['growth_interval'] is 0, not an integer above 0"),
    "growth interval a float": ("growth_interval", 2.5, "['growth_interval'] is 2.5, not an integer above 0"),
    "missing": ("scale", DELETE, "['scale'] is missing"),
}


@pytest.mark.parametrize("front_end", ["lightning", "accelerate"])
@pytest.mark.parametrize("case", SCALER_CASES)
def test_gradient_scaler_state_is_checked_as_torch_s_constructor_does(case: str, front_end: str, tmp_path: Path) -> None:
    key, value, fragment = SCALER_CASES[case]
    current = torch.amp.GradScaler("cpu").state_dict()
    saved = _replaced(current, [key], value)
    assert scaler_problem(current, current) is None
    if front_end == "lightning":
        with pytest.raises(CheckpointError) as raised:
            check_lightning_state(tmp_path, {**LIGHTNING_STATE, "MixedPrecision": saved}, scalers={"MixedPrecision": current})
        assert f"state.pt entry MixedPrecision{fragment}" in str(raised.value), str(raised.value)
    else:
        assert fragment in scaler_problem(saved, current)


def test_shown_keeps_a_tensor_to_one_line() -> None:
    assert count_problem(torch.zeros(4, 4)) == "is a torch.float32 tensor of shape [4, 4], not a non-negative integer"
    assert "\n" not in shown({"a": torch.zeros(8, 8), "b": torch.ones(3, dtype=torch.int64)})

    class Multiline:
        def __repr__(self) -> str:
            return "one\ntwo\rthree"
    assert shown(Multiline()) == "one\\ntwo\\rthree"


def test_finetune_keeps_a_step_folder_it_did_not_write_and_says_so(accelerate_run: _Accelerate, tmp_path: Path) -> None:
    from meshplan.finetune.frontends import _save_only_latest
    from meshplan.finetune.job import FinetuneJob

    job = FinetuneJob(model="model", data="reviews", recipe="ddp", framework="accelerate", devices=1, max_steps=2,
                      output=str(tmp_path))
    shutil.copytree(accelerate_run.saved, job.checkpoints / "step=1")
    (job.checkpoints / "step=0").mkdir()
    (job.checkpoints / "step=0" / "notes.txt").write_text("mine")
    with pytest.warns(UserWarning, match=r"meshplan kept .*step=0.* it is not a meshplan checkpoint") as caught:
        _save_only_latest(accelerate_run.accelerator, job, 2)
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    assert sorted(path.name for path in job.checkpoints.iterdir()) == ["step=0", "step=2"]
    assert (job.checkpoints / "step=0" / "notes.txt").read_text() == "mine"


def _scheduler(make: Callable[[torch.optim.Optimizer], Any], steps: int) -> Any:
    """A scheduler made by ``make`` that has stepped ``steps`` times."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9)
    scheduler = make(optimizer)
    for step in range(steps):
        optimizer.step()
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            scheduler.step(1.0 / (step + 1))
        else:
            scheduler.step()
    return scheduler


def _as_saved(state: dict[str, Any]) -> Any:
    """``state`` as it comes back from state.pt."""
    buffer = io.BytesIO()
    torch.save(plain_data(state), buffer)
    return torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)


SCHEDULERS = {
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda step: 0.9 ** step),
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, 2),
    "MultiStepLR": lambda o: torch.optim.lr_scheduler.MultiStepLR(o, [2, 4]),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, 1.0, total_steps=20),
    "CyclicLR": lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.1),
    "CosineAnnealingWarmRestarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 3),
    "ReduceLROnPlateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o),
    "SequentialLR": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o), torch.optim.lr_scheduler.ExponentialLR(o, 0.9)], milestones=[3]),
}


@pytest.mark.parametrize("name", SCHEDULERS)
def test_torch_schedulers_states_after_training_fit_a_fresh_scheduler(name: str) -> None:
    # The check must not refuse a valid resume: the state of a scheduler that has stepped, loaded
    # as state.pt loads it, is accepted by the same scheduler freshly made.
    fresh = _scheduler(SCHEDULERS[name], 0).state_dict()
    assert like_problem(_as_saved(_scheduler(SCHEDULERS[name], 5).state_dict()), fresh, "the scheduler") is None
    assert like_problem({**fresh, "optimizer": 1}, fresh, "the scheduler") == "['optimizer'] is not an entry the scheduler has"


# ---------------------------------------------------------------- fuzz: random mutations of a real checkpoint


def _positions(node: Any) -> list[tuple[Any, Any]]:
    """(container, key or index) of every value inside ``node``."""
    found = []
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
    for key, child in list(children):
        found.append((node, key))
        found += _positions(child)
    return found


def _manifest_values(outside: Path, size: int) -> list[Any]:
    sentinel = str(outside / "sentinel.safetensors")
    return [None, True, False, 0, -1, 1, 7, 2**63, 10**30, 1.5, float("nan"), float("inf"), "", ".", "..", "x" * 300,
            sentinel, "../" + os.path.relpath(sentinel, "/"), "sentinel-link.safetensors", TENSORS, "state.pt",
            "rank-00000.pt", MANIFEST, EMBED, TIED, NORM, "optimizer/" + EMBED + "/exp_avg", [], {}, [1, 2], [EMBED],
            {"a": 1}, {"sentinel-link.safetensors": size}, {TENSORS: size}, {"prefix": "", "class": "X", "config": {}}]


def _header_values(data_length: int) -> list[Any]:
    return [-8, -1, 0, 1, 4, 2**31, 2**63, 2**64, data_length, data_length + 8, [0, 0], [-8, 120], [128, 0],
            [0, data_length], [100000], [2**40, 2**40], [True, 32], [32.0], [0, 32], [], "F16", "I32", "BF16", "F64",
            "U8", "BOOL", "C64", None, {}, "x", {"a": 1}, [1, 2, 3]]


def _mutate_tree(rng: random.Random, tree: Any, values: list[Any]) -> str:
    container, key = rng.choice(_positions(tree))
    operation = rng.choice(["replace", "replace", "replace", "delete", "rename", "tweak"])
    if operation == "delete":
        del container[key]
        return f"deleted [{key!r}]"
    if operation == "rename" and isinstance(container, dict):
        new = rng.choice([value for value in values if isinstance(value, str)])
        container[new] = container.pop(key)
        return f"renamed [{key!r}] to {new!r}"
    if operation == "tweak" and type(container[key]) is int:
        container[key] += rng.choice([-8, -1, 1, 4, 8, 2**32])
        return f"tweaked [{key!r}] to {container[key]}"
    container[key] = copy.deepcopy(rng.choice(values))
    return f"set [{key!r}] to {container[key]!r:.60}"


def _mutate_manifest(rng: random.Random, path: Path, outside: Path) -> str:
    manifest = _manifest(path)
    values = _manifest_values(outside, manifest["files"][TENSORS])
    what = "manifest: " + "; ".join(_mutate_tree(rng, manifest, values) for _ in range(rng.choice([1, 1, 2, 3])))
    (path / MANIFEST).write_text(json.dumps(manifest))
    return what


def _redirect(rng: random.Random, path: Path, outside: Path) -> str:
    """The attack itself: the sentinel listed in files under some name, with its true size, and tensors pointed at it."""
    sentinel = outside / "sentinel.safetensors"
    climbing = "../" * 12 + str(sentinel)[1:]
    name = rng.choice([str(sentinel), os.path.relpath(sentinel, path), "sentinel-link.safetensors", climbing])
    manifest = _manifest(path)
    manifest["files"][name] = sentinel.stat().st_size
    keys = rng.sample(sorted(manifest["tensors"]), rng.choice([1, 5, len(manifest["tensors"])]))
    manifest["tensors"].update({key: name for key in keys})
    if rng.random() < 0.5:
        manifest["files"].pop(TENSORS)
        manifest["tensors"] = {key: name for key in manifest["tensors"]}
    (path / MANIFEST).write_text(json.dumps(manifest))
    return f"redirect to {name!r}"


def _mutate_header(rng: random.Random, path: Path, outside: Path) -> str:
    header, data = _read_tensor_file(path / TENSORS)
    what = "header: " + "; ".join(_mutate_tree(rng, header, _header_values(len(data))) for _ in range(rng.choice([1, 1, 2])))
    _write_tensor_file(path / TENSORS, header, data)
    if rng.random() < 0.85:
        _resize(path, TENSORS)
    return what


def _mutate_header_bytes(rng: random.Random, path: Path, outside: Path) -> str:
    raw = bytearray((path / TENSORS).read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    choice = rng.randrange(4)
    if choice == 0:
        position = rng.randrange(8 + length)
        raw[position] = rng.randrange(256)
        what = f"byte {position} set to {raw[position]}"
    elif choice == 1:
        new = rng.choice([0, 1, 2, length - 1, length + 1, length + 8, len(raw), 2**63, 2**64 - 1, 100_000_001])
        raw[:8] = struct.pack("<Q", new)
        what = f"header length {new}"
    elif choice == 2:
        cut = rng.randrange(len(raw))
        del raw[cut:]
        what = f"cut at {cut}"
    else:
        raw += bytes(rng.randrange(1, 64))
        what = "bytes appended"
    (path / TENSORS).write_bytes(bytes(raw))
    if rng.random() < 0.85:
        _resize(path, TENSORS)
    return "header bytes: " + what


def _mutate_files(rng: random.Random, path: Path, outside: Path) -> str:
    name = rng.choice([TENSORS, "state.pt", "rank-00000.pt", MANIFEST])
    kind = rng.choice(["link to the sentinel", "link to the secret", "fifo", "directory", "pickle"])
    manifest_copy = (path / MANIFEST).read_bytes()
    (path / name).unlink()
    if kind == "link to the sentinel":
        (path / name).symlink_to(outside / "sentinel.safetensors")
    elif kind == "link to the secret":
        (path / name).symlink_to(outside / "secret")
    elif kind == "fifo":
        os.mkfifo(path / name)
    elif kind == "directory":
        (path / name).mkdir()
    else:
        (path / name).write_bytes(manifest_copy if name == MANIFEST else pickle.dumps({"global_step": 1}))
        if name != MANIFEST:
            _resize(path, name)
    return f"files: {name} made a {kind}"


def _random_place(rng: random.Random, data: Any) -> list[Any]:
    """The keys of some value inside ``data``: one level down, then deeper with probability 0.6 a level."""
    place: list[Any] = []
    node = data
    while isinstance(node, (dict, list, tuple)) and len(node) > 0 and (not place or rng.random() < 0.6):
        key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
        place.append(key)
        node = node[key]
    return place


def _state_values(rng: random.Random, current: Any) -> list[Any]:
    """Values to put in place of ``current`` in a state file: of other types, and near misses of its own."""
    values = [DELETE, None, True, -1, 0, 2**32, 2**64, 1.5, float("nan"), "x", "1.0", [], {}, [1], (1, 2), torch.zeros(3)]
    if type(current) is int:
        values += [current + 1, current - 1, -current - 1, current + 2**32]
    if isinstance(current, (tuple, list)) and current:
        values += [current[:-1], tuple(current) + (0,)]
    if isinstance(current, dict):
        values += [{}, {**current, "x": 1}]
    if torch.is_tensor(current) and current.dim() == 1 and len(current):
        corrupted = current.clone()
        if current.dtype == torch.uint8:  # torch's generator: its seed, position and flags lead the bytes
            corrupted[rng.randrange(min(32, len(current)))] = rng.randrange(256)
        values += [current.float(), current[:len(current) // 2], torch.cat([current, current]), current.long(), corrupted]
    return values


def _mutate_state_file(rng: random.Random, path: Path, outside: Path) -> str:
    """Some value inside state.pt or rank-00000.pt replaced or deleted; the file rewritten by torch.save and listed."""
    name = rng.choice(["state.pt", RANK_FILE])
    data = torch.load(path / name, weights_only=True)
    place = _random_place(rng, data)
    current = data
    for key in place:
        current = current[key]
    value = rng.choice(_state_values(rng, current))
    torch.save(_replaced(data, place, value), path / name)
    _resize(path, name)
    return f"{name}: {place} set to {'nothing' if value is DELETE else repr(value):.60}"


MUTATIONS = [_mutate_manifest] * 4 + [_mutate_header] * 3 + [_mutate_header_bytes] * 2 + [_mutate_files, _redirect]
MUTATIONS += [_mutate_state_file] * 3


def _same(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Bit for bit (NaN included) the same tensor."""
    return (actual.dtype == expected.dtype and actual.shape == expected.shape
            and torch.equal(actual.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8)))


def _file_contents(path: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the manifest as safetensors' own reader reads it from the checkpoint's files."""
    contents = {}
    for file in set(manifest["tensors"].values()):
        with safe_open(str(path / file), framework="pt") as opened:
            contents.update({key: opened.get_tensor(key) for key, held_in in manifest["tensors"].items() if held_in == file})
    return contents


def _try_case(path: Path, out: Path, model: LlamaForCausalLM, initial: dict[str, torch.Tensor]) -> str:
    """Reads, exports and loads the checkpoint at ``path``; a CheckpointError at any stage is a clean refusal.

    What is read must be what the checkpoint's own files hold; any other exception propagates.
    """
    try:
        reader = CheckpointReader(path)
    except CheckpointError:
        return "refused when opened"
    expected = _file_contents(path, reader.manifest)
    for key in reader.keys():
        assert _same(reader.tensor(key), expected[key]), key
    for read in (reader.state, lambda: reader.rank_state(0)):
        with contextlib.suppress(CheckpointError):
            read()
    try:
        export(path, out)
    except CheckpointError:
        pass
    else:
        for file in out.iterdir():
            assert PATTERN not in file.read_bytes(), file
        _check_export(out, reader.manifest, expected)
    model.load_state_dict(initial)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    try:
        load_training_state(path, {"model": model}, {"optimizer": optimizer})
    except CheckpointError:
        return "refused when loaded"
    aliases, seen = reader.manifest["aliases"], set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:  # a tied weight is loaded once, under its first name
            seen.add(id(tensor))
            key = aliases.get(f"model/{name}", f"model/{name}")
            assert _same(tensor.detach(), expected[key].to(tensor.dtype)), name
    _step(model, optimizer)  # what a resumed run does next must work
    return "loaded"


def _check_export(out: Path, manifest: dict[str, Any], expected: dict[str, torch.Tensor]) -> None:
    """The exported model, read back by safetensors' own reader, holds exactly the model's tensors as the
    checkpoint's files hold them: each stored name once, and each alias whose tensor is outside the model."""
    [(module, entry)] = [(module, entry) for module, entries in manifest["models"].items() for entry in entries]
    prefix = f"{module}/{entry['prefix']}"
    wanted = {key[len(prefix):]: key for key in manifest["tensors"] if key.startswith(prefix)}
    wanted.update({alias[len(prefix):]: key for alias, key in manifest["aliases"].items()
                   if alias.startswith(prefix) and not key.startswith(prefix)})
    exported: dict[str, torch.Tensor] = {}
    for file in out.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as opened:
            exported.update({name: opened.get_tensor(name) for name in opened.keys()})
    assert sorted(exported) == sorted(wanted)
    assert all(_same(tensor, expected[wanted[name]]) for name, tensor in exported.items())


def _try_state_files(path: Path) -> str:
    """What the front ends check before they load anything (Lightning's state, the generator states); a
    CheckpointError is a clean refusal, and states that pass must be taken by the generators."""
    reader = CheckpointReader(path)  # only a state file was changed: the rest checks out
    try:
        check_lightning_state(reader.path, reader.state())
        generators = saved_random_states(reader, 0)
    except CheckpointError:
        return "state refused"
    with _generators_kept():
        set_random_states(generators)
    return "state loaded"


@pytest.mark.slow  # about a minute of mutated checkpoints on 2 cores
def test_fuzzed_checkpoints_load_exactly_or_are_refused(pristine: Path, outside: Path, tmp_path: Path) -> None:
    rng = random.Random(FUZZ_SEED)
    model = _tiny_llama()
    initial = copy.deepcopy(model.state_dict())
    outcomes: Counter[str] = Counter()
    started = time.monotonic()
    for case in range(FUZZ_CASES):
        folder = tmp_path / f"case-{case}"
        path = folder / "step=1.ckpt"
        shutil.copytree(pristine, path)
        (path / "sentinel-link.safetensors").symlink_to(outside / "sentinel.safetensors")
        mutation = rng.choice(MUTATIONS)
        what = mutation(rng, path, outside)
        try:
            with _deadline(5):
                if mutation is _mutate_state_file:
                    outcomes[_try_state_files(path)] += 1
                else:
                    outcomes[_try_case(path, folder / "exported", model, initial)] += 1
        except (Exception, Hung) as error:  # noqa: BLE001 - reported with the mutation that caused it
            pytest.fail(f"fuzz case {case} ({what}): {type(error).__name__}: {error}")
        shutil.rmtree(folder)
    seconds = time.monotonic() - started
    print(f"fuzz: {sum(outcomes.values())} mutations tried in {seconds:.1f} s: {dict(outcomes)}")
    assert sum(outcomes.values()) >= FUZZ_CASES
    assert outcomes["loaded"] > 0 and outcomes["refused when opened"] > 0
    assert outcomes["state loaded"] > 0 and outcomes["state refused"] > 0
