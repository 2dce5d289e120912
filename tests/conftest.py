"""Fixtures shared by the test modules that train toy models (they opt in with ``pytestmark``)."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Toy models gain nothing from threads, and a busy 2-core machine makes extra threads very slow."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def toy_loaders(monkeypatch):
    """The grid's loaders replaced by the toy task/model/method builders of ``dist_train``."""
    from dist_train import CALLS, TOY_LOADERS

    from structlora.repro import grid

    for name, fn in TOY_LOADERS.items():
        monkeypatch.setitem(grid.LOADERS, name, fn)
    for k in CALLS:
        CALLS[k] = 0
    yield
