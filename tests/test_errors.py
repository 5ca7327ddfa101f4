"""errors.user_message: the one line a user sees, also for errors raised in DataLoader workers."""

from __future__ import annotations

from pathlib import Path

import h5py
import pytest
from conftest import write_root
from torch._utils import ExceptionWrapper
from torch.utils.data import DataLoader, Dataset

from noa_dist.data.dataset import WellWindowDataset
from noa_dist.errors import ConfigError, DataError, user_message

MULTI_LINE = "the dataset does not fit:\n  first problem\n  second: problem"


class _Failing(Dataset):
    """Raises MULTI_LINE as a DataError from every item (module level: workers unpickle it)."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int):
        raise DataError(MULTI_LINE)


def _damage_first_chunk(shard: Path, key: str) -> None:
    """Overwrite the bytes of `key`'s first compressed chunk: inflating it then fails."""
    with h5py.File(shard, "r") as f:
        chunk = f[key].id.get_chunk_info(0)
    with open(shard, "r+b") as raw:
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * chunk.size)


def _first_batch_error(dataset: Dataset) -> BaseException:
    loader = DataLoader(dataset, batch_size=1, num_workers=1)
    with pytest.raises(Exception) as err:  # noqa: PT011 - whatever torch re-raises
        next(iter(loader))
    return err.value


@pytest.mark.timeout(120)
def test_a_shard_damaged_after_opening_reads_as_its_real_message_from_a_worker(tmp_path):
    root = write_root(tmp_path / "tiny", compression="gzip")
    dataset = WellWindowDataset(root, "train", timesteps=4)
    shard, row, _ = dataset.locate(0)
    _damage_first_chunk(shard, "t0_fields/pressure")

    raised = _first_batch_error(dataset)
    assert isinstance(raised, DataError)
    assert str(raised).startswith("Caught DataError in DataLoader worker process 0.\n")

    with pytest.raises(DataError) as direct:  # the same read in this process
        dataset[0]
    assert str(direct.value).startswith(f"cannot read {shard} trajectory {row} ")
    assert user_message(raised) == f"{direct.value} (in DataLoader worker 0)"
    assert "Traceback" not in user_message(raised) and "\n" not in user_message(raised)


@pytest.mark.timeout(120)
def test_a_multi_line_message_from_a_worker_is_kept_whole():
    raised = _first_batch_error(_Failing())
    assert user_message(raised) == f"{MULTI_LINE} (in DataLoader worker 0)"


def _reraised_by_torch(error: BaseException, worker: int) -> BaseException:
    """`error` as torch's DataLoader re-raises it in the main process (its ExceptionWrapper)."""
    try:
        raise error
    except BaseException:
        wrapper = ExceptionWrapper(where=f"in DataLoader worker process {worker}")
    with pytest.raises(type(error)) as err:
        wrapper.reraise()
    return err.value


def test_the_last_of_chained_exceptions_is_the_message():
    caused = DataError("x.hdf5: unreadable")
    caused.__cause__ = OSError("a cause that was never raised, so without frames")
    try:
        try:
            raise KeyError("t0_fields/pressure")
        except KeyError as exc:
            raise ConfigError("no field pressure:\n  t0_fields") from exc
    except ConfigError as exc:
        during_handling = exc
    assert user_message(_reraised_by_torch(caused, 1)) == (
        "x.hdf5: unreadable (in DataLoader worker 1)"
    )
    assert user_message(_reraised_by_torch(during_handling, 3)) == (
        "no field pressure:\n  t0_fields (in DataLoader worker 3)"
    )


def test_other_errors_are_their_own_message():
    assert user_message(DataError("x.hdf5: missing")) == "x.hdf5: missing"
    assert user_message(ValueError("a\nb")) == "a\nb"
    assert user_message(DataError("Caught DataError in DataLoader worker process 0.")) == (
        "Caught DataError in DataLoader worker process 0."
    )
