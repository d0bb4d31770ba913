"""Fixtures for every test. Shared helper functions live in tests/helpers.py."""
import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # wandb must never need a network or an account in tests
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")


@pytest.fixture
def cifar_spec():
    from bdcore.datasets import CIFAR10

    return CIFAR10.spec


@pytest.fixture
def gray_spec():
    from bdcore.data import DatasetSpec

    return DatasetSpec("fashion_mnist", 10, 1, 28, 28, (0.286,), (0.353,))
