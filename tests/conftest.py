"""Shared test fixtures: the real scans of ../shared/data and throwaway nnU-Net folder trees."""
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
DATA = SHARED / "data"
FIXTURES = SHARED / "fixtures"

# one thread: tiny models on a busy 2-core box run far faster than with two competing threads
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Stock nnU-Net calls made in-process (planning, prediction) change torch's thread count and leave it so;
    reset it, or a later in-process run no longer matches a single-threaded subprocess bit for bit."""
    torch.set_num_threads(1)


def need_shared(path: Path = SHARED) -> Path:
    """Skip (with the reason) only when ../shared is absent; CI always has it."""
    if not path.exists():
        pytest.skip(f"{path} is absent: the real scans and reference fixtures live in ../shared beside the checkout")
    return path


@pytest.fixture
def data_dir() -> Path:
    return need_shared(DATA)


@pytest.fixture
def fixtures_dir() -> Path:
    return need_shared(FIXTURES)


@pytest.fixture
def nnunet_dirs(tmp_path, monkeypatch) -> dict:
    """Empty nnUNet_raw / nnUNet_preprocessed / nnUNet_results folders, set in the environment."""
    dirs = {}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        d = tmp_path / var
        d.mkdir()
        monkeypatch.setenv(var, str(d))
        dirs[var] = d
    monkeypatch.setenv("nnUNet_compile", "f")
    return dirs


@pytest.fixture(scope="session")
def chain(tmp_path_factory) -> dict:
    """The real-CT nnU-Net chain of tests/nnunet_chain.py, built once for every test that uses it."""
    from nnunet_chain import build_chain
    return build_chain(need_shared(DATA), tmp_path_factory.mktemp("e2e"))
