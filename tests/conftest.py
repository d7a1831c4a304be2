"""Shared fixtures: the repository on sys.path and real MNIST, fetched once."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The tests use small matrices, for which one thread is fastest; on a machine shared with
# other work, several threads waiting on each other can make them 50 times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def mnist_dir():
    """A data dir holding the four MNIST IDX files, fetched by GRU_LE's own code."""
    import GRU_LE

    data_dir = ROOT / "data"
    GRU_LE.ensure_mnist(data_dir)
    return data_dir
