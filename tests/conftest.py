"""Shared fixtures: the repository on sys.path and real MNIST, fetched once."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def mnist_dir():
    """A data dir holding the four MNIST IDX files, fetched by GRU_LE's own code."""
    import GRU_LE

    data_dir = ROOT / "data"
    GRU_LE.ensure_mnist(data_dir)
    return data_dir
