"""The cpu lane's fixtures (tests/conftest.py holds those every lane shares)."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def subprocess_temporaries(tmp_path_factory):
    """Processes the cpu lane's tests start (torchrun writes a ``torchelastic_*`` folder per
    launch into the temporary directory, and its workers theirs) get a temporary directory under
    pytest's base folder, which the test run removes: nothing is left behind in /tmp. This
    process keeps its own."""
    folder = tmp_path_factory.getbasetemp() / "subprocess-tmp"
    folder.mkdir(exist_ok=True)
    saved = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    yield
    if saved is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = saved
