"""NegativeQueue: ring-buffer arithmetic in one process, identical contents on 2 gloo processes."""

from __future__ import annotations


import pytest
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from raytrain_ssl.negative_queue import NegativeQueue

from gloo_ranks import run_on_two_ranks  # tests/ is on sys.path under pytest


def _keys(values: list[float], dim: int = 3) -> torch.Tensor:
    """Rows whose normalised form identifies them: value v -> (v, 1, 1, ...)."""
    return torch.tensor([[v] + [1.0] * (dim - 1) for v in values])


# -- single process --------------------------------------------------------------------------------
def test_empty_queue_has_no_negatives_and_lives_in_state_dict():
    queue = NegativeQueue(size=4, dim=3)
    assert queue.negatives() is None
    assert set(queue.state_dict()) == {"queue", "ptr", "num_filled"}
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(4))


def test_fill_wrap_around_and_state_dict_round_trip():
    queue = NegativeQueue(size=4, dim=3)
    queue.enqueue(_keys([1, 2, 3]))
    torch.testing.assert_close(queue.negatives(), F.normalize(_keys([1, 2, 3]), dim=1))
    queue.enqueue(_keys([4, 5]))  # row 3 then wraps to row 0
    torch.testing.assert_close(queue.negatives(), F.normalize(_keys([5, 2, 3, 4]), dim=1))
    assert (int(queue.ptr), int(queue.num_filled)) == (1, 4)
    queue.enqueue(_keys([6, 7, 8, 9, 10, 11]))  # more than the queue holds: only the newest 4 stay
    torch.testing.assert_close(queue.negatives(), F.normalize(_keys([11, 8, 9, 10]), dim=1))
    assert int(queue.ptr) == 1

    restored = NegativeQueue(size=4, dim=3)
    restored.load_state_dict(queue.state_dict())
    torch.testing.assert_close(restored.negatives(), queue.negatives())
    assert int(restored.ptr) == 1


def test_keys_are_detached():
    keys = _keys([1, 2]).requires_grad_(True)
    queue = NegativeQueue(size=4, dim=3)
    queue.enqueue(keys * 2)
    assert not queue.negatives().requires_grad


# -- two processes ---------------------------------------------------------------------------------
def _queue_worker(rank: int) -> None:
    queue = NegativeQueue(size=5, dim=3)  # random init differs per rank; only filled rows matter
    queue.enqueue(_keys([10 * rank + 1, 10 * rank + 2]))  # rank 0: 1, 2; rank 1: 11, 12
    torch.testing.assert_close(queue.negatives(), F.normalize(_keys([1, 2, 11, 12]), dim=1))
    queue.enqueue(_keys([10 * rank + 3, 10 * rank + 4]))  # gathered 3, 4, 13, 14 -> rows 4, 0, 1, 2
    torch.testing.assert_close(queue.negatives(), F.normalize(_keys([4, 13, 14, 12, 3]), dim=1))
    assert (int(queue.ptr), int(queue.num_filled)) == (3, 5)

    other = queue.queue.clone()
    torch_dist.broadcast(other, src=0)
    assert torch.equal(other, queue.queue), "ranks hold different queues"


@pytest.mark.timeout(120)
def test_both_ranks_hold_both_ranks_keys():
    run_on_two_ranks(_queue_worker)
