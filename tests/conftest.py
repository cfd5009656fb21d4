import os

import matplotlib
import pytest
from hypothesis import HealthCheck, settings

matplotlib.use("Agg", force=True)

# Derandomized, bounded profile for CI (the default); "dev" explores more examples with fresh seeds.
settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def one_thread():
    """Run every test on one intra-op thread: the suite runs two pytest workers on two cores, and tiny models are
    fastest single-threaded (two OpenMP threads per worker would wait for each other in every operator)."""
    try:
        import torch
    except ImportError:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """A tiny Fashion-MNIST folder (48 training, 12 test images) in torchvision's layout, one per test module."""
    from data_files import write_fashion
    root = tmp_path_factory.mktemp("data")
    write_fashion(root / "FashionMNIST" / "raw", compressed=True, n_train=48, n_test=12)
    return root
