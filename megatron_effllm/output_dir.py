"""Where the command-line tools write: never over an input, replacing only what this project
wrote, and never half-written.

- ``check_output``: before any work, an output that equals, contains or lies inside an input
  (symlinks resolved) is refused, and so is an existing output unless ``overwrite`` is given and
  the output is this project's (a folder holding ``MARKER``, or a file an ``owned`` check accepts).
- ``write_folder`` / ``write_file``: the result is written into a hidden sibling and renamed into
  place when complete; an output being replaced is removed only after that. A failure (a full
  disk, a read-only location, Ctrl-C) leaves the previous output, or nothing, at the path.
- A failed write (full disk, quota, read-only file system, permissions) ends in one line naming
  the path, the reason and what was kept.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator, Sequence

from megatron_effllm.errors import UserError

# Written into every output folder of the tools; --overwrite replaces only folders that hold it.
MARKER = ".effllm_output.json"
MARKER_FORMAT = "megatron_effllm.output/1"

_NO_SPACE = {errno.ENOSPC: "free space", errno.EDQUOT: "free space or raise the quota",
             errno.EFBIG: "choose a file system that allows large files"}
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR)


def is_project_folder(path: str) -> bool:
    """Whether ``path`` is a folder one of the tools wrote (it holds ``MARKER``)."""
    return os.path.isfile(os.path.join(path, MARKER))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_not_input(out: str, inputs: Sequence[str | None], flag: str = "--out") -> None:
    """Refuse an output that is, contains or lies inside one of ``inputs`` (real paths)."""
    real = os.path.realpath(out)
    for given in inputs:
        if not given:
            continue
        src = os.path.realpath(given)
        if real == src:
            raise UserError(f"{flag} {out} is the input {given}; write the result to a new path")
        if _within(real, src):
            raise UserError(f"{flag} {out} lies inside the input {given}; write the result outside it")
        if _within(src, real):
            raise UserError(f"{flag} {out} contains the input {given}; choose a path that holds no input")


def check_output(out: str, *, inputs: Sequence[str | None] = (), overwrite: bool = False,
                 file_owned: Callable[[str], bool] | None = None, flag: str = "--out") -> str:
    """The absolute output path, checked before any work (see the module docstring).

    A folder output by default; with ``file_owned`` a file output, replaceable under
    ``overwrite`` when ``file_owned(path)`` says this project wrote it.
    """
    path = os.path.abspath(out)
    check_not_input(path, inputs, flag)
    is_file = file_owned is not None
    if os.path.isdir(path):
        if is_file:
            raise UserError(f"{flag} {out} is a folder; give the path of the file to write")
        if os.listdir(path):
            _check_replaceable(path, out, overwrite, is_project_folder(path), "folder", flag)
    elif os.path.lexists(path):
        if not is_file:
            raise UserError(f"{flag} {out} is an existing file; give the path of a folder to create")
        _check_replaceable(path, out, overwrite, file_owned(path), "file", flag)
    _check_writable(path, flag)
    return path


def _check_replaceable(path: str, out: str, overwrite: bool, owned: bool, kind: str, flag: str) -> None:
    if not overwrite:
        fix = "pass --overwrite to replace it" if owned else "remove it"
        raise UserError(f"{flag} {out} already exists; choose a new {kind} or {fix}")
    if not owned:
        what = f"holds no {MARKER}" if kind == "folder" else "is not one of its outputs"
        raise UserError(f"{flag} {out} was not written by megatron_effllm ({what}); --overwrite replaces "
                        f"only this project's outputs: choose a new {kind} or remove it yourself")


def _check_writable(path: str, flag: str) -> None:
    """Refuse early a location that cannot be written (the first existing ancestor decides)."""
    parent = os.path.dirname(path)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder; choose another location")
    try:
        read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only or not os.access(parent, os.W_OK | os.X_OK):
        why = "read-only file system" if read_only else "permission denied"
        raise UserError(f"cannot write {flag} {path}: {parent} is not writable ({why}); choose a writable location")


# ------------------------------------------------------------------------------ failed writes
# torch's zip writer reports a failed write (a full disk, a file size limit) without an errno
_TORCH_WRITE_FAILURE = ("PytorchStreamWriter failed writing", "file write failed", "unexpected pos")
WRITE_FAILED = -1  # a failed write whose OS error the writer did not keep


def _os_error(err: BaseException) -> tuple[int | None, str | None]:
    """(errno, file name) of the OS error behind ``err``: an OSError, one it was raised from, one
    inside a distributed checkpoint failure, or one a native writer (safetensors, torch's zip
    writer) names in its text; ``WRITE_FAILED`` for a write failure without one."""
    seen = set()
    todo = [err]
    failed = False
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno, e.filename if isinstance(e.filename, str) else None
        text = str(e)
        match = re.search(r"\[Errno (\d+)\]|os error (\d+)\)|Os \{ code: (\d+)", text)
        if match:
            return int(next(g for g in match.groups() if g)), None
        if "No space left on device" in text:  # a writer that kept the words but not the errno
            return errno.ENOSPC, None
        failed = failed or any(m in text for m in _TORCH_WRITE_FAILURE)
        todo += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch.distributed.checkpoint's CheckpointException
        if isinstance(failures, dict):
            for value in failures.values():  # an exception, or (exception, traceback)
                todo += [v for v in (value if isinstance(value, tuple) else (value,)) if isinstance(v, BaseException)]
    return (WRITE_FAILED if failed else None), None


def _free_mib(path: str) -> float | None:
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or "/").free / 2**20
    except OSError:
        return None


def failed_write(err: BaseException, path: str) -> tuple[str, str] | None:
    """(reason, fix) for a write of ``path`` that failed on the disk's side (a full disk, a quota,
    a file size limit, a read-only or missing location); None for any other failure (and for an
    interrupt or a UserError, which pass as they are)."""
    if isinstance(err, (UserError, KeyboardInterrupt, SystemExit, GeneratorExit)):
        return None
    code, filename = _os_error(err)
    if filename:
        name, parent = os.path.realpath(filename), os.path.realpath(os.path.dirname(path))
        if not (_within(name, parent) or _within(parent, name)):
            return None  # about another path (an input that vanished, say), not the output
    free = _free_mib(path)
    low = free is not None and free < 64
    if code in _NO_SPACE or (code == WRITE_FAILED and low):
        code = errno.ENOSPC if code == WRITE_FAILED else code
        reason = os.strerror(code) + (f", {free:.1f} MiB free" if code == errno.ENOSPC and free is not None else "")
        return reason, _NO_SPACE[code]
    if code == WRITE_FAILED:
        return "the write failed", "check the free space, quota and file size limits"
    if code in _NOT_WRITABLE:
        return os.strerror(code), "choose a writable location"
    return None


def write_error(err: BaseException, path: str, existed: bool) -> UserError | None:
    """One line for a write of ``path`` that failed on the disk's side (``failed_write``)."""
    failed = failed_write(err, path)
    if failed is None:
        return None
    reason, fix = failed
    kept = f"the previous {path} is unchanged" if existed else f"nothing was left at {path}"
    return UserError(f"could not write {path} ({reason}); {fix} and run again; {kept}")


@contextlib.contextmanager
def disk_errors(path: str, existed: bool = False) -> Iterator[None]:
    """Turn a failed write of ``path`` (full disk, read-only, ...) into a one-line UserError."""
    try:
        yield
    except BaseException as err:  # torch's CheckpointException is not an Exception
        user = write_error(err, path, existed)
        if user is None:
            raise
        raise user from None


# ------------------------------------------------------------------------------ writing aside
def _staging(path: str) -> str:
    parent, base = os.path.split(path)
    return os.path.join(parent, f".{base}.partial-{uuid.uuid4().hex[:8]}")


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def write_folder(out: str, *, kind: str, overwrite: bool = False) -> Iterator[str]:
    """Yield the path of a staging folder (not yet created) next to ``out``; when the block ends
    without error, mark it as this project's output (what ``kind`` of folder) and rename it to ``out``. An existing ``out`` is
    replaced only with ``overwrite`` and ``MARKER`` in it, and removed only after the rename."""
    path = os.path.abspath(out)
    existed = os.path.lexists(path)
    if existed:  # refused before the work, and checked again before the rename
        _check_existing_folder(path, overwrite)
    stage = _staging(path)
    with disk_errors(path, existed):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            yield stage
            with open(os.path.join(stage, MARKER), "w") as f:
                json.dump({"format": MARKER_FORMAT, "kind": kind}, f)
            _replace_folder(stage, path, overwrite)
        except BaseException:
            _remove(stage)
            raise


def _replace_folder(stage: str, path: str, overwrite: bool) -> None:
    if os.path.isdir(path) and not os.path.islink(path) and not os.listdir(path):
        os.rmdir(path)  # an empty folder holds nothing to keep
    if not os.path.lexists(path):
        os.rename(stage, path)
        return
    _check_existing_folder(path, overwrite)
    old = f"{stage}.old"
    os.rename(path, old)
    try:
        os.rename(stage, path)
    except BaseException:
        os.rename(old, path)
        raise
    _remove(old)


def _check_existing_folder(path: str, overwrite: bool) -> None:
    if not os.path.isdir(path):
        raise UserError(f"{path} is an existing file; give the path of a folder to create")
    if os.listdir(path):
        _check_replaceable(path, path, overwrite, is_project_folder(path), "folder", "output")


@contextlib.contextmanager
def write_file(out: str, *, owned: Callable[[str], bool], overwrite: bool = False) -> Iterator[str]:
    """Yield a staging file path next to ``out``; when the block ends without error, rename it to
    ``out`` (atomically replacing a previous output that ``owned`` accepts, with ``overwrite``)."""
    path = os.path.abspath(out)
    existed = os.path.lexists(path)
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; give the path of the file to write")
    if existed:
        _check_replaceable(path, path, overwrite, owned(path), "file", "output")
    stage = _staging(path)
    with disk_errors(path, existed):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            yield stage
            os.replace(stage, path)
        except BaseException:
            _remove(stage)
            raise
