"""One run per output folder: the lock on ``<out>/.lock``, who holds it, and its release."""

import os
import socket

import pytest

from fastclr.train.runlock import OutputInUseError, OutputLock


def test_a_held_folder_is_refused_naming_its_owner_until_released(tmp_path):
    # flock locks belong to an open file, so two locks in one process conflict as two processes do
    with OutputLock(tmp_path / "run"):
        with pytest.raises(OutputInUseError) as info:
            OutputLock(tmp_path / "run").acquire()
        message = str(info.value)
        assert f"(pid {os.getpid()} on {socket.gethostname()}, started " in message, message
        assert message.startswith(f"{tmp_path / 'run'} is in use by another fastclr run")
        assert isinstance(info.value, OSError)  # the CLI's one-line error, on every rank
    with OutputLock(tmp_path / "run"):  # released: free again
        pass
    assert (tmp_path / "run" / ".lock").read_text() == ""  # no owner recorded once released
