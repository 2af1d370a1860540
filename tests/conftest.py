"""Fixtures every test file shares."""

import pytest
from accelerate.state import AcceleratorState


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Each Trainer builds an Accelerator; its process-wide state must not leak into the next test."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
