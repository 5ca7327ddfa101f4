"""Threads per process: each process gets its share of the node's cores unless told otherwise
(accelerate launch exports OMP_NUM_THREADS=1, which would leave the other cores idle)."""

from __future__ import annotations

import os

import pytest
import torch

from noa_dist.distributed import set_threads

LAUNCHED = {"ACCELERATE_DYNAMO_BACKEND": "NO"}  # what `accelerate launch` exports


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def four_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)


@pytest.mark.parametrize(
    ("env", "requested", "threads", "why"),
    [
        ({"OMP_NUM_THREADS": "1", **LAUNCHED}, None, 4, "4 core(s) / 1 process(es) on this node"),
        ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2", **LAUNCHED}, None, 2, "/ 2 process(es)"),
        ({"OMP_NUM_THREADS": "1"}, None, 1, "(OMP_NUM_THREADS)"),  # no launcher: the user's
        ({}, None, 4, "4 core(s) / 1 process(es)"),
        ({"LOCAL_WORLD_SIZE": "8"}, None, 1, "4 core(s) / 8 process(es)"),
        ({"OMP_NUM_THREADS": "3"}, None, 3, "(OMP_NUM_THREADS)"),
        ({"OMP_NUM_THREADS": "3"}, 1, 1, "(--threads-per-process)"),
    ],
)
def test_threads_per_process(monkeypatch, four_cores, env, requested, threads, why):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for key in ("LOCAL_WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    said = set_threads(requested)
    assert torch.get_num_threads() == threads
    assert said.startswith(f"{threads} thread(s) per process") and why in said
