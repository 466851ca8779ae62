"""The resumable, rank-sharded sampler and dataloader."""

from __future__ import annotations

from modalforge.data import loader as loader_mod
from modalforge.data.loader import ResumableDataLoader, ResumableSampler


def test_resume_skips_exactly_the_consumed_batches():
    data = list(range(40))
    full = ResumableDataLoader(data, batch_size=4, shuffle=True, seed=3)
    full.sampler.set_epoch(2)
    expected = [b.tolist() for b in full]

    first = ResumableDataLoader(data, batch_size=4, shuffle=True, seed=3)
    first.sampler.set_epoch(2)
    it = iter(first)
    seen = [next(it).tolist() for _ in range(3)]
    state = first.state_dict()
    assert state == {"epoch": 2, "batches_yielded": 3, "seed": 3}

    resumed = ResumableDataLoader(data, batch_size=4, shuffle=True, seed=3)
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    rest = [b.tolist() for b in resumed]
    assert seen + rest == expected
    # the next epoch starts from the beginning again
    resumed.sampler.set_epoch(3)
    assert len(list(resumed)) == 10


def test_epochs_reshuffle_deterministically():
    s = ResumableSampler(list(range(10)), seed=1)
    s.set_epoch(0)
    a = list(s)
    s.set_epoch(1)
    b = list(s)
    s.set_epoch(0)
    assert list(s) == a and a != b and sorted(a) == list(range(10))


def test_ranks_get_disjoint_equal_shards(monkeypatch):
    shards = []
    for rank in range(3):
        monkeypatch.setattr(loader_mod, "rank_world", lambda rank=rank: (rank, 3))
        s = ResumableSampler(list(range(10)), shuffle=False)
        shards.append(list(s))
    assert [len(x) for x in shards] == [4, 4, 4]
    assert set(shards[0]) | set(shards[1]) | set(shards[2]) == set(range(10))
    # like DistributedSampler: padded by wrapping, so only the first 2 indices appear twice
    assert sorted(sum(shards, [])) == sorted(list(range(10)) + [0, 1])
