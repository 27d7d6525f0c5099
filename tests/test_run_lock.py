"""The run folder's lock: who holds it, stale locks on this host, locks from other hosts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from kontext_train.train.run_checks import RunError
from kontext_train.train.run_lock import LOCK_NAME, RunLockedError, run_lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_lock(folder, **holder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK_NAME).write_text(json.dumps({"started": "earlier", "token": "t", **holder}))


def test_the_lock_records_pid_and_host_and_goes_away(tmp_path):
    with run_lock(tmp_path / "run") as lock:
        holder = json.loads(lock.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(RunLockedError, match=f"process {os.getpid()} on {socket.gethostname()}"):
            with run_lock(tmp_path / "run"):
                pass
        assert json.loads(lock.read_text()) == holder  # the refused attempt left it alone
    assert not lock.exists()


def test_a_stale_lock_on_this_host_is_taken_over(tmp_path, caplog):
    _write_lock(tmp_path, pid=_dead_pid(), host=socket.gethostname())
    with run_lock(tmp_path) as lock:
        assert json.loads(lock.read_text())["token"] != "t"
    assert "stale lock" in caplog.text


def test_a_lock_from_another_host_or_unreadable_is_never_taken_over(tmp_path):
    _write_lock(tmp_path, pid=_dead_pid(), host="elsewhere.invalid")
    with pytest.raises(RunLockedError, match="on elsewhere.invalid"):
        with run_lock(tmp_path):
            pass
    (tmp_path / LOCK_NAME).write_text("{not json")
    with pytest.raises(RunLockedError, match="unreadable"):
        with run_lock(tmp_path):
            pass
    assert (tmp_path / LOCK_NAME).read_text() == "{not json"


@pytest.mark.parametrize("what", ["lock_folder", "lock_fifo", "run_dir_file"])
def test_a_lock_or_run_folder_of_the_wrong_kind_is_a_clear_error(tmp_path, what):
    # Once IsADirectoryError (run.lock a folder) or FileExistsError (the run folder a file).
    run = tmp_path / "run"
    if what == "run_dir_file":
        run.write_text("x")
        path, needed = run, "its folder"
    else:
        run.mkdir()
        path, needed = run / LOCK_NAME, "its lock file"
        if what == "lock_folder":
            path.mkdir()
        else:
            os.mkfifo(path)
    with pytest.raises(RunError) as e:
        with run_lock(run):
            pass
    message = str(e.value)
    assert str(path) in message and needed in message and "move it away" in message
