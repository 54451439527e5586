"""The cpu lane's fixtures (tests/conftest.py holds those every lane shares)."""

import pytest


@pytest.fixture(scope="session", autouse=True)
def subprocess_temporaries(tmp_path_factory):
    """Processes the cpu lane's tests start (torchrun writes a ``torchelastic_*`` folder per
    launch into the temporary directory, and its workers theirs) get a temporary directory under
    pytest's base folder, which the test run removes: nothing is left behind in /tmp. This
    process keeps its own."""
    folder = tmp_path_factory.getbasetemp() / "subprocess-tmp"
    folder.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as env:  # restored at the end of the session
        env.setenv("TMPDIR", str(folder))
        yield
