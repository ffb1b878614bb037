import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: thread hand-offs cost more than they save, and the CI box is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
