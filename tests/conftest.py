"""Shared test fixtures. Tests run on CPU with tiny synthetic data unless marked integration."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CIFAR_SUBSET = Path(os.environ.get("ROBAUDIT_CIFAR_SUBSET", REPO.parent / "shared" / "data" / "cifar10_subset.npz"))


@pytest.fixture
def cifar_subset_path():
    if not CIFAR_SUBSET.exists():
        pytest.skip(f"real CIFAR-10 subset not found at {CIFAR_SUBSET}")
    return CIFAR_SUBSET


@pytest.fixture(autouse=True)
def _single_thread_torch():
    # Two cores shared by the suite: one intra-op thread keeps timings stable.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
