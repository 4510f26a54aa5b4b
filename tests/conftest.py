import pytest


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Trainers default to writing logs, checkpoints and precision reports into the working directory."""
    monkeypatch.chdir(tmp_path)
