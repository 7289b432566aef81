"""meshplan writes only where it may, and deletes or overwrites nothing it did not create.

`meshplan finetune --output` refuses a non-empty directory that no earlier run wrote (unless
--overwrite) before loading anything; `meshplan export` writes into a folder of its own and
renames it into place (creating missing parents), removes it on any failure, and refuses links and files
as OUT before reading the checkpoint. Every refusal is exit code 2 and one line on stderr.
Checkpoints are saved in this process (one process, no process group) from a tiny Llama.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from meshplan.checkpoint import CheckpointError, export, save_training_state
from meshplan.checkpoint.tensor_files import TensorFileWriter
from meshplan.cli import main
from meshplan.finetune.errors import FinetuneError
from meshplan.finetune.job import FinetuneJob
from meshplan.finetune.output import check_output, deleted_by_save_pretrained, is_job_file

AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------- helpers


def _user_files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """A user's folder: two files and a subfolder with one, written before meshplan runs."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.txt").write_text("my notes\n")
    (folder / "config.json").write_text('{"mine": true}\n')  # a name save_pretrained writes too
    (folder / "data").mkdir()
    (folder / "data" / "train.csv").write_text("text,label\nfine,1\n")
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder``: its bytes and its modification time in nanoseconds."""
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _job(output: Path) -> FinetuneJob:
    return FinetuneJob(model="m", data="reviews", recipe="zero2.yaml", framework="lightning", devices=2, max_steps=3,
                       output=str(output))


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64, max_position_embeddings=64))


def _previous_output(folder: Path) -> None:
    """What an earlier `meshplan finetune` left: its job.json, log, metrics, model and checkpoints."""
    folder.mkdir(parents=True)
    _job(folder).to_json(folder / "job.json")
    (folder / "meshplan-finetune.log").write_text("an earlier run\n")
    (folder / "metrics.json").write_text('{"train_steps": 3}\n')
    (folder / "config.json").write_text("{}\n")
    (folder / "model.safetensors").write_bytes(b"weights")
    (folder / "checkpoints" / "step=2.ckpt").mkdir(parents=True)


# ---------------------------------------------------------------- meshplan finetune --output


def test_finetune_into_a_foreign_non_empty_directory_is_refused_before_anything_starts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "mine"
    before = _user_files(output)
    # A model that does not exist: had the output check come after the job's checks, the error would name it.
    code = main(["finetune", "--output", str(output), "--model", str(tmp_path / "no-model")])
    assert code == 2
    error = _one_line_error(capsys)
    assert error.startswith("meshplan finetune: --output") and "--overwrite" in error and "new or empty" in error
    assert "'notes.txt'" in error and "no-model" not in error
    assert _snapshot(output) == before  # byte for byte, mtimes too
    assert sorted(path.name for path in output.iterdir()) == ["config.json", "data", "notes.txt"]  # no job.json, no log


def test_overwrite_lets_finetune_write_into_a_foreign_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "mine"
    before = _user_files(output)
    assert check_output(str(output), overwrite=True) == output.resolve()
    # Past the output check, the job's own checks run: an unknown front end stops it there.
    assert main(["finetune", "--output", str(output), "--overwrite", "--framework", "bogus"]) == 2
    assert "--framework 'bogus' is unknown" in _one_line_error(capsys)
    assert _snapshot(output) == before


def test_overwrite_still_refuses_a_directory_whose_files_saving_the_model_would_delete(tmp_path: Path) -> None:
    output = tmp_path / "a-model"
    output.mkdir()
    (output / "model-00001-of-00002.safetensors").write_bytes(b"someone's shard")
    with pytest.raises(FinetuneError, match=r"holds 'model-00001-of-00002.safetensors', which saving the model would delete"):
        check_output(str(output), overwrite=True)
    assert deleted_by_save_pretrained("model-00002-of-00002.safetensors")
    assert not deleted_by_save_pretrained("model.safetensors") and not deleted_by_save_pretrained("notes-00001-of-00002")


def test_a_previous_finetune_output_is_reused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "run"
    _previous_output(output)
    before = _snapshot(output)
    assert is_job_file(output / "job.json")
    assert check_output(str(output)) == output.resolve()
    assert main(["finetune", "--output", str(output), "--framework", "bogus"]) == 2
    assert "--framework 'bogus' is unknown" in _one_line_error(capsys)
    assert _snapshot(output) == before


def test_a_job_file_from_before_the_format_mark_is_recognised_and_a_foreign_one_is_not(tmp_path: Path) -> None:
    fields = dataclasses.asdict(_job(tmp_path))
    (tmp_path / "old.json").write_text(json.dumps(fields))  # exactly the job's fields, no "format"
    assert is_job_file(tmp_path / "old.json")
    (tmp_path / "foreign.json").write_text(json.dumps({"name": "my job", "steps": 3}))
    (tmp_path / "other-format.json").write_text(json.dumps({**fields, "format": "something-else"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "deep.json").write_text("[" * 100_000)
    (tmp_path / "huge-int.json").write_text('{"model": ' + "9" * 5000 + "}")
    os.mkfifo(tmp_path / "fifo.json")  # must not hang
    for name in ("foreign.json", "other-format.json", "list.json", "deep.json", "huge-int.json", "fifo.json", "none.json"):
        assert not is_job_file(tmp_path / name), name


def test_a_foreign_job_json_does_not_make_a_directory_meshplan_s(tmp_path: Path) -> None:
    output = tmp_path / "theirs"
    output.mkdir()
    (output / "job.json").write_text('{"name": "a scheduler job"}')
    with pytest.raises(FinetuneError, match="no earlier meshplan finetune wrote"):
        check_output(str(output))


def test_a_directory_holding_only_a_finetune_log_is_accepted(tmp_path: Path) -> None:
    # A run appends to its log and deletes nothing: nothing there is lost.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "meshplan-finetune.log").write_text("an earlier run's output\n")
    assert check_output(str(tmp_path / "out")) == (tmp_path / "out").resolve()


@pytest.mark.parametrize("name", ["metrics.json", "config.json", "model.safetensors", "tokenizer.json"])
def test_a_link_in_place_of_a_file_a_run_writes_is_refused_even_with_overwrite(name: str, tmp_path: Path) -> None:
    # job.json and metrics.json are meshplan's; config.json, the weights and the tokenizer are save_pretrained's.
    output = tmp_path / "run"
    _previous_output(output)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("not meshplan's")
    (output / name).unlink(missing_ok=True)
    (output / name).symlink_to(elsewhere)
    for overwrite in (False, True):
        with pytest.raises(FinetuneError, match=f"holds a symbolic link '{name}'"):
            check_output(str(output), overwrite=overwrite)
    assert elsewhere.read_text() == "not meshplan's"


def test_the_job_file_replaces_a_link_instead_of_writing_through_it(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere.txt"
    elsewhere.write_text("keep me")
    (tmp_path / "job.json").symlink_to(elsewhere)
    _job(tmp_path).to_json(tmp_path / "job.json")
    assert elsewhere.read_text() == "keep me"
    assert not (tmp_path / "job.json").is_symlink() and is_job_file(tmp_path / "job.json")
    assert FinetuneJob.from_json(str(tmp_path / "job.json")) == _job(tmp_path)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["elsewhere.txt", "job.json"]  # no staged file left


def _bad_outputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "to-a-file").symlink_to(tmp_path / "a-file")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    os.mkfifo(tmp_path / "a-fifo")
    return {
        "a file": (tmp_path / "a-file", "is not a directory"),
        "a link to nothing": (tmp_path / "dangling", "points to nothing"),
        "a folder inside a link to nothing": (tmp_path / "dangling" / "run", "points to nothing"),
        "a link to a file": (tmp_path / "to-a-file", "is not a directory"),
        "a loop of links": (tmp_path / "loop", "cannot be resolved"),
        "a FIFO": (tmp_path / "a-fifo", "is not a directory"),
        "a folder inside a file": (tmp_path / "a-file" / "run", "is not a directory"),
    }


@pytest.mark.parametrize("case", ["a file", "a link to nothing", "a folder inside a link to nothing", "a link to a file",
                                  "a loop of links", "a FIFO", "a folder inside a file"])
def test_an_output_that_is_not_a_directory_is_refused(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output, expected = _bad_outputs(tmp_path)[case]
    assert main(["finetune", "--output", str(output), "--overwrite"]) == 2
    assert expected in _one_line_error(capsys)
    assert (tmp_path / "a-file").read_text() == "mine" and not (tmp_path / "nowhere").exists()


def test_an_output_through_a_link_to_a_directory_is_the_directory(tmp_path: Path) -> None:
    (tmp_path / "scratch").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "scratch")
    assert check_output(str(tmp_path / "out")) == (tmp_path / "scratch").resolve()
    assert check_output(str(tmp_path / "out" / "run")) == (tmp_path / "scratch" / "run").resolve()


@pytest.mark.skipif(AS_ROOT, reason="root writes anywhere: file permissions do not apply")
def test_an_output_this_user_cannot_write_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(FinetuneError, match="cannot write"):
            check_output(str(locked))
        with pytest.raises(FinetuneError, match="cannot write"):
            check_output(str(locked / "run"))
        with pytest.raises(CheckpointError, match="cannot write"):
            export(tmp_path / "no-checkpoint", locked / "model")
    finally:
        locked.chmod(0o700)


# ---------------------------------------------------------------- meshplan export


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real checkpoint of a tiny Llama (hidden 32, 2 layers), saved in this one process."""
    return save_training_state(tmp_path_factory.mktemp("ckpt") / "step=1", {"model": _tiny_llama()}, {}, state={"step": 1})


def test_export_leaves_a_foreign_partial_folder_untouched(checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    partial = tmp_path / ".model.partial"  # the name export used to clear without asking
    before = _user_files(partial)
    assert main(["export", str(checkpoint), str(tmp_path / "model")]) == 0
    assert _snapshot(partial) == before
    assert LlamaForCausalLM.from_pretrained(tmp_path / "model") is not None
    assert sorted(path.name for path in tmp_path.iterdir()) == [".model.partial", "model"]  # nothing else left
    capsys.readouterr()


def test_export_into_an_empty_directory_replaces_it(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    assert (export(checkpoint, tmp_path / "model") / "model.safetensors").is_file()


def test_export_creates_missing_parent_directories(checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "models" / "run-1" / "model"
    assert (export(checkpoint, out) / "model.safetensors").is_file()
    assert sorted(path.name for path in out.parent.iterdir()) == ["model"]  # no partial folder left beside it


def test_a_write_failing_mid_export_leaves_neither_a_partial_folder_nor_out(checkpoint: Path, tmp_path: Path,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    # A real write failure, even as root: files may not grow past 40 kB (the model is about 90 kB).
    # Python ignores SIGXFSZ, so the write that crosses the limit raises OSError (EFBIG).
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (40_000, hard))
    try:
        with pytest.raises(OSError):
            export(checkpoint, tmp_path / "model")
        assert list(tmp_path.iterdir()) == []
        code = main(["export", str(checkpoint), str(tmp_path / "model")])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == 2
    error = _one_line_error(capsys)
    assert error.startswith("meshplan export: File too large") and "nothing was written" in error
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_export_leaves_neither_a_partial_folder_nor_out(checkpoint: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    write = TensorFileWriter.write
    written = []

    def ctrl_c_after_two_tensors(self: TensorFileWriter, name: str, tensor: torch.Tensor) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(name)
        write(self, name, tensor)

    monkeypatch.setattr(TensorFileWriter, "write", ctrl_c_after_two_tensors)
    with pytest.raises(KeyboardInterrupt):
        export(checkpoint, tmp_path / "model")
    assert written and list(tmp_path.iterdir()) == []
    assert main(["export", str(checkpoint), str(tmp_path / "model")]) == 130
    assert "interrupted; nothing was written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _bad_targets(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    (tmp_path / "a-dir").mkdir()
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "to-a-dir").symlink_to(tmp_path / "a-dir")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    (tmp_path / "odd\nname").write_text("mine")
    return {
        "a link to a directory": (tmp_path / "to-a-dir", "is a symbolic link"),
        "a link to nothing": (tmp_path / "dangling", "is a symbolic link"),
        "a file": (tmp_path / "a-file", "already exists and is not a directory"),
        "a name with a line break": (tmp_path / "odd\nname", "already exists and is not a directory"),
        "a non-empty directory": (tmp_path / "full", "already exists and is not an empty directory"),
        "a file as parent": (tmp_path / "a-file" / "model", "is not a directory"),
    }


@pytest.mark.parametrize("case", ["a link to a directory", "a link to nothing", "a file", "a name with a line break",
                                  "a non-empty directory", "a file as parent"])
def test_export_refuses_an_out_it_cannot_create_before_any_work(case: str, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    out, expected = _bad_targets(tmp_path)[case]
    before = _snapshot(tmp_path)
    # A checkpoint that does not exist: had OUT been checked after reading it, the error would say so.
    assert main(["export", str(tmp_path / "no-checkpoint"), str(out)]) == 2
    error = _one_line_error(capsys)
    assert expected in error and "no checkpoint" not in error
    assert _snapshot(tmp_path) == before and not (tmp_path / "nowhere").exists()
    assert not [path for path in tmp_path.rglob(".*partial*")]


def test_one_line_even_when_a_name_in_the_message_holds_line_breaks(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(tmp_path / "no\nsuch\ncheckpoint"), str(tmp_path / "model")]) == 2
    assert "no checkpoint at" in _one_line_error(capsys)
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("size", ["9" * 5000, "0", "-1", "lots"])
def test_a_bad_max_shard_size_is_one_line_before_any_work(size: str, checkpoint: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", str(checkpoint), str(tmp_path / "model"), "--max-shard-size", size]) == 2
    error = _one_line_error(capsys)
    assert "is not a size such as 500MB" in error and len(error) < 300
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- the Accelerate front end's checkpoint pruning


def test_accelerate_finetune_prunes_only_its_own_checkpoints(tmp_path: Path) -> None:
    from meshplan._compat.accelerate import reset_process_state

    import meshplan
    from meshplan.finetune.frontends import _save_only_latest

    checkpoints = tmp_path / "checkpoints"
    before = _user_files(checkpoints / "step=1")  # a user's folder that happens to match step=*
    (checkpoints / "step=notes.txt").write_text("mine")
    accelerator = meshplan.accelerator(meshplan.DDP())  # one process, no launcher
    try:
        accelerator.prepare(_tiny_llama())
        for step in (2, 3):
            _save_only_latest(accelerator, _job(tmp_path), step)
    finally:
        reset_process_state()
    assert sorted(path.name for path in checkpoints.iterdir()) == ["step=1", "step=3", "step=notes.txt"]
    assert _snapshot(checkpoints / "step=1") == before and (checkpoints / "step=notes.txt").read_text() == "mine"
