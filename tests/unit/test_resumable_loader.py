"""Mid-epoch resume and the number of processes / batch size: Lightning restores its own count of the epoch's
batches in the checkpoint's units, so a loader converting its position to another rank count or batch size still
lost draws (a review reproduced 4 of 8 remaining batches per rank never trained on 1 -> 2 processes). Such a resume
is refused; the same setting resumes exactly, and a checkpoint at an epoch end resumes on any setting."""

from __future__ import annotations

import pytest
from torch.utils.data import DataLoader, DistributedSampler

from ecgfm.config import ConfigError
from ecgfm.train.loop import ResumableDataLoader

N = 24


def _loader(rank: int, world: int, state: dict | None = None, done: int = 0, batch: int = 2) -> DataLoader:
    sampler = DistributedSampler(list(range(N)), num_replicas=world, rank=rank, shuffle=True, seed=0)
    dl = ResumableDataLoader.wrap(DataLoader(list(range(N)), batch_size=batch, sampler=sampler), lambda: (0, done))
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


@pytest.mark.parametrize("world,done", [(1, 5), (2, 3)])
def test_the_same_setting_resumes_every_draw_of_the_epoch_once(world, done):
    drawn = [d for r in range(world) for d in _draws(_loader(r, world), done)]
    state = _loader(0, world, done=done).state_dict()
    assert (state["world"], state["batch_size"], state["epoch_batches"]) == (world, 2, N // (2 * world))
    drawn += [d for r in range(world) for d in _draws(_loader(r, world, state))]
    assert sorted(drawn) == list(range(N))


@pytest.mark.parametrize("before,after", [((1, 2), (2, 2)), ((2, 2), (1, 2)), ((1, 2), (1, 4)), ((1, 4), (1, 2))])
def test_another_rank_count_or_batch_size_mid_epoch_is_refused(before, after):
    state = _loader(0, before[0], done=2, batch=before[1]).state_dict()
    with pytest.raises(ConfigError, match=rf"2 batches into epoch 0 on {before[0]} process\(es\) with batch size "
                                          rf"{before[1]}; resuming on {after[0]} process\(es\) with batch size "
                                          rf"{after[1]}"):
        _loader(0, after[0], state, batch=after[1])


def test_a_checkpoint_at_an_epoch_end_resumes_on_any_setting():
    """The epoch's end is read in the checkpoint's units (12 batches of 2 on 1 process; 2 processes of batch 4 have
    3 per epoch, so the old check on this loader's length took batch 5 of 12 for an epoch end)."""
    end = _loader(0, 1, done=12).state_dict()
    dl = _loader(0, 2, end, batch=4)
    assert dl.batch_sampler.skip == 0 and dl.sampler.epoch == 1
    with pytest.raises(ConfigError):
        _loader(0, 2, _loader(0, 1, done=5).state_dict(), batch=4)
    old = {"epoch": 0, "batches": 3, "world": 1}      # a checkpoint written before batch_size / epoch_batches
    assert _loader(0, 1, old).batch_sampler.skip == 3
