"""Output folders and files of the tools (megatron_effllm.output_dir): never an input, replaced only
when a tool wrote them and only once the new one is complete, one line when the disk fails."""
import errno
import os
from pathlib import Path

import pytest
from torch.distributed.checkpoint.api import CheckpointException

from megatron_effllm import output_dir
from megatron_effllm.errors import UserError


def _tree(folder) -> dict:
    return {os.path.relpath(os.path.join(r, f), folder): Path(r, f).read_bytes()
            for r, _, fs in os.walk(folder) for f in fs}


def _write_model(stage, text="new"):
    os.makedirs(stage)
    with open(os.path.join(stage, "weights.bin"), "w") as f:
        f.write(text)


@pytest.fixture
def models(tmp_path):
    """A folder of models: the input, a sibling model and a notes file."""
    top = tmp_path / "models"
    (top / "model").mkdir(parents=True)
    (top / "model" / "config.json").write_text("{}")
    (top / "other").mkdir()
    (top / "other" / "config.json").write_text("{}")
    (top / "notes.txt").write_text("notes")
    return top


@pytest.mark.parametrize("out, expected", [
    ("models/model", "is the input"),
    ("models", "contains the input"),
    ("models/model/pruned", "lies inside the input"),
    ("link", "is the input"),
    ("link/pruned", "lies inside the input"),
])
def test_output_that_overlaps_an_input_is_refused(tmp_path, models, out, expected):
    os.symlink(models / "model", tmp_path / "link")
    before = _tree(models)
    with pytest.raises(UserError, match=expected):
        output_dir.check_output(str(tmp_path / out), inputs=[str(models / "model")], overwrite=True)
    assert _tree(models) == before


def test_overwrite_replaces_only_marked_folders(tmp_path, models):
    out = tmp_path / "pruned"
    with output_dir.write_folder(str(out), kind="test") as stage:
        _write_model(stage, "first")
    assert output_dir.is_project_folder(str(out))
    with pytest.raises(UserError, match="already exists; choose a new folder or pass --overwrite"):
        output_dir.check_output(str(out))
    assert output_dir.check_output(str(out), overwrite=True) == str(out)
    with output_dir.write_folder(str(out), kind="test", overwrite=True) as stage:
        _write_model(stage, "second")
    assert (out / "weights.bin").read_text() == "second"
    assert sorted(os.listdir(tmp_path)) == ["models", "pruned"]  # no staging or old folder left
    # a folder no tool wrote: refused up front and again at the rename
    with pytest.raises(UserError, match="was not written by megatron_effllm"):
        output_dir.check_output(str(models / "other"), overwrite=True)
    with (pytest.raises(UserError, match="was not written by megatron_effllm"),
          output_dir.write_folder(str(models / "other"), kind="test", overwrite=True) as stage):
        _write_model(stage)
    assert (models / "other" / "config.json").read_text() == "{}"
    assert sorted(os.listdir(models)) == ["model", "notes.txt", "other"]


def test_failed_write_keeps_the_previous_output(tmp_path):
    out = tmp_path / "pruned"
    with output_dir.write_folder(str(out), kind="test") as stage:
        _write_model(stage, "first")
    before = _tree(out)
    with pytest.raises(UserError) as err, output_dir.write_folder(str(out), kind="test", overwrite=True) as stage:
        _write_model(stage, "half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(stage, "weights.bin"))
    msg = str(err.value)
    assert "\n" not in msg and f"({os.strerror(errno.ENOSPC)}, " in msg and "MiB free" in msg
    assert msg.endswith(f"the previous {out} is unchanged")
    assert _tree(out) == before and os.listdir(tmp_path) == ["pruned"]
    # an interrupt passes as it is, and cleans up too
    with pytest.raises(KeyboardInterrupt), output_dir.write_folder(str(tmp_path / "new"), kind="test") as stage:
        _write_model(stage)
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["pruned"]


@pytest.mark.parametrize("err, reason", [
    # safetensors (Rust) names the OS error in its text
    (RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"),
     os.strerror(errno.ENOSPC)),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), os.strerror(errno.EROFS)),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), os.strerror(errno.EDQUOT)),
    # megatron's distributed checkpoint: a BaseException holding the worker's failure
    (CheckpointException("write", {0: (RuntimeError("Worker failure: [Errno 28] No space left on device"), None)}),
     os.strerror(errno.ENOSPC)),
    (CheckpointException("write", {0: (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected "
                                                    "pos 704 vs 598"), None)}), "the write failed"),
])
def test_disk_failures_become_one_line(tmp_path, err, reason):
    out = str(tmp_path / "out.gguf")
    with pytest.raises(UserError) as raised, output_dir.disk_errors(out):
        raise err
    msg = str(raised.value)
    assert "\n" not in msg and msg.startswith(f"could not write {out} ({reason}")
    assert msg.endswith(f"nothing was left at {out}")


def test_other_failures_pass_unchanged(tmp_path):
    with pytest.raises(ValueError), output_dir.disk_errors(str(tmp_path / "out")):
        raise ValueError("a bug, not the disk")
    # an input that vanished is not a failed write of the output
    with pytest.raises(FileNotFoundError), output_dir.disk_errors(str(tmp_path / "out")):
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/elsewhere/tokenizer.json")


def test_file_outputs(tmp_path):
    ours = tmp_path / "model.gguf"
    with output_dir.write_file(str(ours), owned=lambda p: True) as stage:
        Path(stage).write_text("first")
    with pytest.raises(UserError, match="already exists; choose a new file or pass --overwrite"):
        output_dir.check_output(str(ours), file_owned=lambda p: True)
    with output_dir.write_file(str(ours), owned=lambda p: True, overwrite=True) as stage:
        Path(stage).write_text("second")
    assert ours.read_text() == "second" and os.listdir(tmp_path) == ["model.gguf"]
    notes = tmp_path / "notes.txt"
    notes.write_text("keep")
    with pytest.raises(UserError, match="was not written by megatron_effllm"):
        output_dir.check_output(str(notes), overwrite=True, file_owned=lambda p: False)
    with pytest.raises(UserError, match="is a folder; give the path of the file"):
        output_dir.check_output(str(tmp_path), overwrite=True, file_owned=lambda p: True)
    assert notes.read_text() == "keep"


def test_read_only_location(tmp_path):
    """A folder that cannot be written is refused before any work (root ignores permission bits)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("permission bits do not bind for this user (root)")
        with pytest.raises(UserError, match="is not writable .*choose a writable location"):
            output_dir.check_output(str(ro / "out"))
    finally:
        os.chmod(ro, 0o755)
