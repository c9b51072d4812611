"""Shared fixtures. Tests run on a CPU in seconds: tiny random-init models, the teaching sets, and the public
sets from $PEFTLAB_DATA_DIR (CI sets it to ../shared/data)."""

import os
from pathlib import Path

import matplotlib
import pytest
import torch

matplotlib.use("Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def public_data_dir(monkeypatch) -> Path:
    """The folder of the public data sets: $PEFTLAB_DATA_DIR, else ../shared/data beside the checkout.

    Outside CI a machine without them skips the tests that read them; in CI (CI=true) their absence fails.
    """
    candidates = [os.environ.get("PEFTLAB_DATA_DIR"), REPO.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "fin_tweets").is_dir():
            monkeypatch.setenv("PEFTLAB_DATA_DIR", str(candidate))
            return Path(candidate)
    if os.environ.get("CI"):
        pytest.fail("CI must provide the public data sets: set PEFTLAB_DATA_DIR (.ci/run points it at ../shared/data)")
    pytest.skip("public data sets not available here (set PEFTLAB_DATA_DIR)")


@pytest.fixture
def no_public_data(monkeypatch, tmp_path) -> Path:
    """No data folder and an empty peftlab home: as on a fresh offline machine."""
    monkeypatch.delenv("PEFTLAB_DATA_DIR", raising=False)
    monkeypatch.delenv("PEFTLAB_DOWNLOAD", raising=False)
    monkeypatch.setenv("PEFTLAB_HOME", str(tmp_path / "home"))
    return tmp_path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two OpenMP threads waiting on each other
    made a training step of a tiny model 200 times slower (0.9 s instead of 4 ms). Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
