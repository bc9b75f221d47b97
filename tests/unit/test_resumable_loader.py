"""Mid-epoch resume on another number of processes: the ranks take interleaved slots of one global order, so the
loader state (epoch, batches per rank) converts when the drawn prefix splits evenly over the new ranks, else the
resume is refused (it repeated or skipped draws silently)."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from ecgfm.config import ConfigError
from ecgfm.train.loop import ResumableDataLoader

N, B = 24, 2


def _loader(rank: int, world: int, state: dict | None = None, done: int = 0) -> DataLoader:
    sampler = DistributedSampler(list(range(N)), num_replicas=world, rank=rank, shuffle=True, seed=0)
    dl = ResumableDataLoader.wrap(DataLoader(list(range(N)), batch_size=B, sampler=sampler), lambda: (0, done))
    dl.sampler.set_epoch(0)
    if state is not None:
        dl.load_state_dict(state)
    return dl


def _draws(dl: DataLoader, n: int | None = None) -> list[int]:
    out: list[int] = []
    for i, batch in enumerate(dl.batch_sampler):
        if n is not None and i >= n:
            break
        out += list(batch)
    return out


@pytest.mark.parametrize("before,after,done", [(2, 1, 2), (1, 2, 2), (2, 2, 3)])
def test_every_draw_of_the_epoch_once_across_a_change_of_ranks(before, after, done):
    drawn = [d for r in range(before) for d in _draws(_loader(r, before), done)]
    state = _loader(0, before, done=done).state_dict()
    assert state["world"] == before
    drawn += [d for r in range(after) for d in _draws(_loader(r, after, state))]
    assert sorted(drawn) == list(range(N))


def test_a_prefix_that_does_not_split_over_the_new_ranks_is_refused():
    state = _loader(0, 1, done=3).state_dict()
    with pytest.raises(ConfigError, match="3 batches into epoch 0 on 1 process.*resuming on 2"):
        _loader(0, 2, state)
