from __future__ import annotations

import itertools

import pytest
import torch.utils.data

from noa_dist.data.sampler import DistributedBatchSampler, ShardedEvalSampler
from noa_dist.errors import ConfigError


def rank_batches(n, batch_size, world, *, epoch=0, seed=0, drop_last=True, shuffle=True):
    """All ranks' batches of one epoch: list over ranks of lists of batches."""
    out = []
    for rank in range(world):
        sampler = DistributedBatchSampler(
            n,
            batch_size,
            num_replicas=world,
            rank=rank,
            seed=seed,
            shuffle=shuffle,
            drop_last=drop_last,
        )
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def flat(batches):
    return [i for batch in batches for i in batch]


class CountingDataset(torch.utils.data.Dataset):
    """Records every index it is asked for."""

    def __init__(self, n):
        self.n = n
        self.touched: list[int] = []

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.touched.append(i)
        return i


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_get_disjoint_batches_and_drop_last_covers_all_but_the_tail(world):
    n, batch_size = 103, 4
    per_rank = rank_batches(n, batch_size, world, drop_last=True)
    items = [flat(b) for b in per_rank]
    assert all(len(b) == len(per_rank[0]) for b in per_rank)
    assert all(len(batch) == batch_size for b in per_rank for batch in b)
    union = set().union(*map(set, items))
    assert sum(map(len, items)) == len(union)  # disjoint, no repeats
    round_size = batch_size * world
    assert len(union) == n - n % round_size
    sampler = DistributedBatchSampler(n, batch_size, num_replicas=world, rank=0)
    dropped_tail = set(sampler.epoch_order()[len(union) :].tolist())
    assert union | dropped_tail == set(range(n))


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_without_drop_last_every_item_appears_once_plus_wraparound_padding(world):
    n, batch_size = 103, 4
    per_rank = rank_batches(n, batch_size, world, drop_last=False)
    assert all(len(b) == len(per_rank[0]) for b in per_rank)
    assert all(len(batch) == batch_size for b in per_rank for batch in b)
    # Rebuild the global stream round by round; its first n items are one full permutation.
    rounds = zip(*per_rank, strict=True)
    stream = [i for rnd in rounds for batch in rnd for i in batch]
    assert sorted(stream[:n]) == list(range(n))
    assert stream[n:] == stream[: len(stream) - n]  # padding wraps to the start


def test_padding_wraps_more_than_once_when_dataset_is_smaller_than_a_round():
    per_rank = rank_batches(3, 2, 4, drop_last=False, shuffle=False)
    assert per_rank == [[[0, 1]], [[2, 0]], [[1, 2]], [[0, 1]]]


def test_same_seed_and_epoch_give_the_same_order_and_new_epoch_a_new_one():
    a = rank_batches(50, 5, 2, epoch=3, seed=7)
    assert a == rank_batches(50, 5, 2, epoch=3, seed=7)
    assert a != rank_batches(50, 5, 2, epoch=4, seed=7)
    assert a != rank_batches(50, 5, 2, epoch=3, seed=8)


def test_dropped_items_change_between_epochs_when_shuffling():
    kept = [set(flat(flat(rank_batches(50, 4, 3, epoch=e)))) for e in range(3)]
    dropped = [set(range(50)) - k for k in kept]
    assert all(len(d) == 50 % 12 for d in dropped)
    assert dropped[0] != dropped[1] and dropped[1] != dropped[2]


@pytest.mark.parametrize("drop_last", [True, False])
@pytest.mark.parametrize("k", [0, 1, 5, 12])
def test_resume_at_batch_k_yields_exactly_the_tail_of_the_full_epoch(k, drop_last):
    full = rank_batches(101, 4, 2, epoch=2, drop_last=drop_last)[1]
    sampler = DistributedBatchSampler(101, 4, num_replicas=2, rank=1, drop_last=drop_last)
    sampler.set_epoch(2)
    sampler.set_start_batch(k)
    assert sampler.batches_remaining() == len(full) - k
    assert list(sampler) == full[k:]
    assert list(sampler) == full[k:]  # every pass of the epoch, until set again
    sampler.set_start_batch(0)
    assert list(sampler) == full


@pytest.mark.parametrize("num_workers", [1, 2])
def test_multi_worker_dataloader_resumes_at_batch_k(num_workers):
    """torch's multi-worker DataLoader calls iter(batch_sampler) twice when its iterator is
    created: a start batch that only the first iter() saw was lost (batches 0..k-1 retrained)."""
    sampler = DistributedBatchSampler(400, 8, num_replicas=2, rank=1, seed=3)
    full = list(sampler)
    sampler.set_start_batch(20)
    loader = torch.utils.data.DataLoader(
        CountingDataset(400), batch_sampler=sampler, num_workers=num_workers
    )
    assert [batch.tolist() for batch in loader] == full[20:]


def test_resumed_dataloader_never_reads_items_of_skipped_batches():
    dataset = CountingDataset(400)
    sampler = DistributedBatchSampler(400, 8, num_replicas=2, rank=0, seed=3)
    full = list(sampler)
    sampler.set_start_batch(20)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler)
    got = [batch.tolist() for batch in loader]
    assert got == full[20:]
    assert sorted(dataset.touched) == sorted(flat(full[20:]))


def test_state_dict_round_trip_continues_mid_epoch_and_rolls_over_at_epoch_end():
    sampler = DistributedBatchSampler(64, 4, num_replicas=2, rank=1, seed=5)
    sampler.set_epoch(4)
    full = list(sampler)
    state = sampler.state_dict(batches_done=3)
    assert state == {
        "epoch": 4,
        "start_batch": 3,
        "seed": 5,
        "n_items": 64,
        "batch_size": 4,
        "num_replicas": 2,
        "shuffle": True,
        "drop_last": True,
    }
    resumed = DistributedBatchSampler(64, 4, num_replicas=2, rank=1, seed=5)
    resumed.load_state_dict(state)
    assert (resumed.epoch, resumed.start_batch) == (4, 3)
    assert list(resumed) == full[3:]
    assert sampler.state_dict(batches_done=len(sampler))["epoch"] == 5
    assert sampler.state_dict(batches_done=len(sampler))["start_batch"] == 0


def test_loading_state_from_another_world_size_is_refused_with_advice():
    state = DistributedBatchSampler(64, 4, num_replicas=4).state_dict(batches_done=1)
    other = DistributedBatchSampler(64, 4, num_replicas=2)
    with pytest.raises(
        ConfigError, match=r"num_replicas: checkpoint 4, this run 2.*--num_processes"
    ):
        other.load_state_dict(state)


def test_dataset_smaller_than_one_round_with_drop_last_is_a_config_error():
    with pytest.raises(ConfigError, match=r"n_items=10 .* 16 items"):
        DistributedBatchSampler(10, 4, num_replicas=4)


def test_invalid_rank_is_a_config_error():
    with pytest.raises(ConfigError, match="rank=2"):
        DistributedBatchSampler(10, 1, num_replicas=2, rank=2)


@pytest.mark.parametrize("n, world", [(10, 1), (10, 3), (12, 4), (2, 4), (7, 7)])
def test_eval_sampler_covers_each_item_once_with_equal_counts(n, world):
    samplers = [ShardedEvalSampler(n, num_replicas=world, rank=r) for r in range(world)]
    streams = [list(s) for s in samplers]
    assert len({len(s) for s in streams}) == 1
    assert len(streams[0]) == len(samplers[0])
    real = [s[: sampler.n_real] for s, sampler in zip(streams, samplers, strict=True)]
    assert sorted(flat(real)) == list(range(n))
    assert all(
        s[: sampler.n_real] == list(range(r, n, world))
        for r, (s, sampler) in enumerate(zip(streams, samplers, strict=True))
    )


def test_eval_sampler_reports_real_items_per_batch_with_padding_last():
    sampler = ShardedEvalSampler(10, num_replicas=4, rank=3)  # real: 3, 7; padded to 3
    assert list(sampler) == [3, 7, 3]
    assert [sampler.n_real_in_batch(b, 2) for b in range(2)] == [2, 0]
    assert [sampler.n_real_in_batch(b, 1) for b in range(3)] == [1, 1, 0]
    loader = torch.utils.data.DataLoader(CountingDataset(10), sampler=sampler, batch_size=2)
    counts = [len(batch) for batch in loader]
    assert counts == [2, 1]
    assert list(itertools.chain.from_iterable(loader)) == [3, 7, 3]
