"""Checkpoint failures on 2 real ranks (gloo): every rank raises the same error, quickly.

One launch of tests/dist/checkpoint_scenarios.py runs every scenario (~15 s); the tests
below read its per-rank results. Before each phase ended in an agreement, a failure in the
main-only part of a save left rank 1 in a barrier until the process-group timeout.
"""

from __future__ import annotations

import json
import socket

import pytest
from trainrun import REPO, launch

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(300)]
SCRIPT = REPO / "tests" / "dist" / "checkpoint_scenarios.py"
HOST = socket.gethostname()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[dict, dict]:
    out = tmp_path_factory.mktemp("ckpt-scenarios")
    launch(2, [str(out)], out, script=SCRIPT, timeout=240)
    return tuple(json.loads((out / f"results{r}.json").read_text()) for r in range(2))


def same_error_on_both_ranks(results, name: str, error: str = "CheckpointError") -> str:
    rank0, rank1 = results[0][name], results[1][name]
    assert rank0.get("error") == error, rank0
    assert rank1.get("error") == error, rank1
    assert rank0["message"] == rank1["message"]
    assert max(rank0["seconds"], rank1["seconds"]) < 20, "a rank waited for a timeout"
    return rank0["message"]


def test_a_file_where_the_tmp_folder_should_go_fails_both_ranks_alike(results):
    message = same_error_on_both_ranks(results, "tmp_is_a_file")
    assert ".step-00000001.tmp: preparing the folder failed on rank 0 (host " in message
    assert "Not a directory" in message


def test_a_full_disk_while_the_main_process_seals_fails_both_ranks_with_free_space(results):
    message = same_error_on_both_ranks(results, "seal_fails_on_main")
    assert (
        "step-00000001: sealing (trainer_state.json, COMPLETE, rename) failed on rank 0" in message
    )
    assert "No space left on device" in message and "GiB free of" in message


def test_a_write_error_on_rank_1_alone_fails_both_ranks_naming_rank_1(results):
    message = same_error_on_both_ranks(results, "save_state_fails_on_rank1")
    assert (
        f"writing (save_state) failed on rank 1 (host {HOST}): RuntimeError: basic_ios" in message
    )
    assert "GiB free of" in message and "rank 0 (host" not in message


def test_every_rank_fsyncs_the_files_it_wrote_before_the_seal(results):
    assert "ok" in results[0]["good_save"] and "ok" in results[1]["good_save"]
    assert "random_states_1.pkl" in results[1]["rank1_fsynced"]["ok"]


def test_ranks_that_share_the_folder_agree_on_the_latest_checkpoint(results):
    rank0, rank1 = results[0]["resume_shared"], results[1]["resume_shared"]
    assert rank0["ok"] == rank1["ok"] and rank0["ok"].endswith("step-00000002")


def test_a_bad_resume_path_is_the_same_config_error_on_every_rank(results):
    message = same_error_on_both_ranks(results, "resume_bad_path", "ConfigError")
    assert "nope: not a folder" in message


def test_a_rank_that_does_not_see_the_checkpoint_stops_every_rank(results):
    message = same_error_on_both_ranks(results, "resume_rank1_sees_nothing", "ConfigError")
    assert message.startswith(
        "the checkpoint folder must be shared by all ranks: "
        f"rank 1 (host {HOST}) does not see local/step-00000008"
    )


def test_a_rank_that_sees_another_marker_stops_every_rank(results):
    message = same_error_on_both_ranks(results, "resume_other_marker", "ConfigError")
    assert (
        f"rank 1 (host {HOST}) sees a different COMPLETE marker in local/step-00000008" in message
    )


def test_a_rank_that_sees_a_checkpoint_the_main_process_does_not_stops_every_rank(results):
    message = same_error_on_both_ranks(results, "resume_main_sees_nothing", "ConfigError")
    assert f"rank 1 (host {HOST}) sees local/step-00000008 but the main process" in message


def test_a_load_error_on_rank_1_alone_fails_both_ranks(results):
    message = same_error_on_both_ranks(results, "load_fails_on_rank1")
    assert "loading checkpoint " in message and "loading (load_state) failed on rank 1" in message
