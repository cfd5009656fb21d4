"""Test helpers for the late-phase core (shared/)."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny float64 models run fastest on one intra-op thread; on a busy 2-core machine two OpenMP threads can wait
    milliseconds for each other in every operator."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
