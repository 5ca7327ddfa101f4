"""Rank-aware, resumable samplers that need no communication between ranks.

`DistributedBatchSampler` is handed to a plain `torch.utils.data.DataLoader` as
`batch_sampler` (not through `accelerator.prepare`, which would shard it a second time).
Every rank derives the same global permutation from (seed, epoch), cuts it into rounds of
`batch_size * num_replicas` items and takes its own contiguous slice of each round, so
batch k of every rank is known arithmetically: a resume at batch k touches nothing before it.

`ShardedEvalSampler` splits a validation set over ranks with equal counts (ZeRO-3 gathers
parameters in every forward, so ranks must run the same number of batches) and reports how
many of a rank's items are real so the padding can be masked out of the metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.utils.data

from noa_dist.errors import ConfigError

# Keys that fix the data order; a resume must see the same values or the order changes.
_ORDER_KEYS = ("n_items", "batch_size", "num_replicas", "seed", "shuffle", "drop_last")


def _check_layout(n_items: int, batch_size: int, num_replicas: int, rank: int) -> None:
    problems = []
    if n_items < 1:
        problems.append(f"n_items={n_items}: the dataset is empty (expected >= 1 item)")
    if batch_size < 1:
        problems.append(f"batch_size={batch_size}: expected >= 1")
    if num_replicas < 1:
        problems.append(f"num_replicas={num_replicas}: expected >= 1")
    elif not 0 <= rank < num_replicas:
        problems.append(f"rank={rank}: expected 0 <= rank < num_replicas={num_replicas}")
    if problems:
        raise ConfigError("sampler: " + "; ".join(problems))


class DistributedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's batches of one epoch; equal batch counts on every rank.

    Round j of the epoch is `perm[j*B*R : (j+1)*B*R]` (B = batch_size, R = num_replicas);
    rank r's batch j is the slice `[r*B, (r+1)*B)` of round j. The union over ranks of one
    epoch covers every item once (drop_last=True: except the dropped tail).

    The last, incomplete round:
    - drop_last=True drops it, so every rank has the same number of full batches and no
      collective can wait on a rank that ran out. Up to B*R - 1 items are skipped per epoch;
      with shuffle=True they are different items each epoch (the permutation changes), with
      shuffle=False it is always the same tail of the dataset.
    - drop_last=False completes it by wrapping around to the start of the permutation
      (like torch's DistributedSampler), so a few items appear twice in that epoch.

    The DataLoader may draw batches ahead of the training loop (workers prefetch), so the
    sampler cannot know how many batches were actually trained on: the loop passes that
    count to `state_dict(batches_done)`.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        *,
        num_replicas: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
    ) -> None:
        _check_layout(n_items, batch_size, num_replicas, rank)
        if drop_last and n_items < batch_size * num_replicas:
            raise ConfigError(
                f"sampler: n_items={n_items} is smaller than one round of batch_size={batch_size}"
                f" x num_replicas={num_replicas} = {batch_size * num_replicas} items; with"
                " drop_last=True every epoch would be empty. Use a smaller batch size, fewer"
                " processes, more data, or drop_last=False."
            )
        self.n_items = n_items
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self._epoch = 0
        self._start_batch = 0

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def start_batch(self) -> int:
        """The batch index (within the epoch) the next pass starts at."""
        return self._start_batch

    def __len__(self) -> int:
        """Batches per rank in a full epoch (the same on every rank)."""
        round_size = self.batch_size * self.num_replicas
        if self.drop_last:
            return self.n_items // round_size
        return -(-self.n_items // round_size)

    def batches_remaining(self) -> int:
        """Batches the next pass yields: `len(self) - start_batch`."""
        return len(self) - self._start_batch

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of `epoch`; call before every epoch on every rank."""
        if epoch < 0:
            raise ConfigError(f"sampler: epoch={epoch}, expected >= 0")
        self._epoch = epoch

    def set_start_batch(self, k: int) -> None:
        """Make every pass over the current epoch start at this rank's batch k.

        Kept until the next call: torch's multi-worker DataLoader calls `iter()` on its batch
        sampler twice when it creates its iterator, so a start that only the first `iter()`
        saw would be lost (the epoch would then retrain batches 0..k-1 and never train the
        last k). The training loop sets it for every epoch (0 for a fresh one).
        """
        if not 0 <= k <= len(self):
            raise ConfigError(
                f"sampler: start batch {k} is outside the epoch's 0..{len(self)} batches per rank"
            )
        self._start_batch = k

    def epoch_order(self) -> np.ndarray:
        """The global item order of the current epoch, identical on every rank, length n_items."""
        if not self.shuffle:
            return np.arange(self.n_items, dtype=np.int64)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._epoch]))
        return rng.permutation(self.n_items).astype(np.int64)

    def __iter__(self) -> Iterator[list[int]]:
        """This rank's batches of the epoch from the start batch: the same on every call."""
        start = self._start_batch
        order = self.epoch_order()
        round_size = self.batch_size * self.num_replicas
        n_batches = len(self)
        if not self.drop_last:
            order = np.resize(order, n_batches * round_size)  # wraps around to the start
        for j in range(start, n_batches):
            first = j * round_size + self.rank * self.batch_size
            yield order[first : first + self.batch_size].tolist()

    def state_dict(self, batches_done: int) -> dict[str, int | bool]:
        """Where to resume after `batches_done` of this epoch's batches have been trained on.

        batches_done counts from batch 0 of the epoch, including batches skipped by a
        resume. A finished epoch (batches_done == len) resumes at batch 0 of the next one.
        """
        if not 0 <= batches_done <= len(self):
            raise ValueError(f"batches_done={batches_done} is outside 0..{len(self)}")
        epoch, start = self._epoch, batches_done
        if batches_done == len(self):
            epoch, start = epoch + 1, 0
        state: dict[str, int | bool] = {"epoch": epoch, "start_batch": start}
        state.update({key: getattr(self, key) for key in _ORDER_KEYS})
        return state

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        """Continue the saved order: same epoch, next batch. Refuses a different layout."""
        mismatched = [
            f"{key}: checkpoint {state[key]!r}, this run {getattr(self, key)!r}"
            for key in _ORDER_KEYS
            if key in state and state[key] != getattr(self, key)
        ]
        if mismatched:
            raise ConfigError(
                "cannot resume the data order from this checkpoint ("
                + "; ".join(mismatched)
                + "). Which items each rank sees and where the epoch resumes depend on the"
                " dataset size, per-rank batch size, number of processes, seed, shuffle and"
                " drop_last. Relaunch with the checkpoint's values (e.g. the same"
                " --num_processes and batch size), or start a fresh run without --resume."
            )
        self.set_epoch(int(state["epoch"]))
        self.set_start_batch(int(state["start_batch"]))


class ShardedEvalSampler(torch.utils.data.Sampler[int]):
    """Rank r yields items r, r+R, r+2R, ... of range(n_items), padded to an equal count.

    Every rank yields `ceil(n_items / R)` indices; the first `n_real` are this rank's real
    items, the rest repeat item `rank % n_items` and must be masked out of metrics. Over all
    ranks the real items cover range(n_items) exactly once. No shuffling.
    """

    def __init__(self, n_items: int, *, num_replicas: int = 1, rank: int = 0) -> None:
        _check_layout(n_items, 1, num_replicas, rank)
        self.n_items = n_items
        self.num_replicas = num_replicas
        self.rank = rank
        self.n_real = len(range(rank, n_items, num_replicas))

    def __len__(self) -> int:
        return -(-self.n_items // self.num_replicas)

    def __iter__(self) -> Iterator[int]:
        yield from range(self.rank, self.n_items, self.num_replicas)
        yield from [self.rank % self.n_items] * (len(self) - self.n_real)

    def n_real_in_batch(self, batch_index: int, batch_size: int) -> int:
        """How many leading items of batch `batch_index` (DataLoader batch_size) are real."""
        first = batch_index * batch_size
        return max(0, min(batch_size, self.n_real - first))
