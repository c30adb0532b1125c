import pytest
import torch


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_registry():
    """A registry rebuilt from scratch for the test, and restored afterwards."""
    from vqcore import registry

    saved = registry._registry
    yield registry.reset_registry()
    registry._registry = saved
