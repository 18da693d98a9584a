import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread_and_seed():
    """Tests run on 2-core CI machines: one torch thread keeps parallel work predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)
