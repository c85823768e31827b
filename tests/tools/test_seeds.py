"""The per-test seeding of ``tests/conftest.py``: stable seeds from node ids, the forced seed, fuzz mode, and the
seed printed in a failing test's report."""
from __future__ import annotations

import os
import random
import zlib

import numpy
import pytest
import torch

import conftest
from conftest import FUZZ_ENV, SEED_ENV, choose_seed, node_seed


def test_each_generator_starts_from_the_node_id_seed(request, seed):
    forced = os.environ.get(SEED_ENV, "").strip()
    if conftest.fuzz_mode() and not forced:
        pytest.skip(f"{FUZZ_ENV}=1: this run's seeds are random")
    expected = int(forced) if forced else zlib.crc32(request.node.nodeid.encode()) & 0x7FFFFFFF
    assert seed == expected == choose_seed(request.node.nodeid)
    assert torch.initial_seed() == seed
    drawn = (random.random(), numpy.random.rand(), torch.rand(()).item())
    conftest.seed_everything(seed)
    assert drawn == (random.random(), numpy.random.rand(), torch.rand(()).item())


def test_seed_choice_follows_the_environment(monkeypatch):
    nodeid = "tests/test_x.py::test_y[a-b]"
    monkeypatch.delenv(SEED_ENV, raising=False)
    monkeypatch.delenv(FUZZ_ENV, raising=False)
    assert choose_seed(nodeid) == choose_seed(nodeid) == node_seed(nodeid)
    assert node_seed(nodeid) != node_seed(nodeid + "x") and 0 <= node_seed(nodeid) < 2**31
    monkeypatch.setenv(FUZZ_ENV, "1")
    assert len({choose_seed(nodeid) for _ in range(4)}) > 1, "fuzz mode must draw fresh seeds"
    monkeypatch.setenv(SEED_ENV, "996065625")  # a forced seed wins over fuzz mode
    assert choose_seed(nodeid) == 996065625
    for bad in ("1.5", "seed", "-1", str(2**32)):
        monkeypatch.setenv(SEED_ENV, bad)
        with pytest.raises(pytest.UsageError, match=SEED_ENV):
            choose_seed(nodeid)


def _report_through_the_hook(item, outcome: str) -> pytest.TestReport:
    """Drive conftest's ``pytest_runtest_makereport`` wrapper by hand with a report of ``outcome``."""
    report = pytest.TestReport(item.nodeid, item.location, {}, outcome, None, "call")
    wrapper = conftest.pytest_runtest_makereport(item, None)
    next(wrapper)
    with pytest.raises(StopIteration) as stop:
        wrapper.send(report)
    return stop.value.value


def test_a_failure_reports_its_seed_and_how_to_replay_it(request, seed):
    failed = _report_through_the_hook(request.node, "failed")
    assert failed.sections == [("seed", f"seed={seed} ({SEED_ENV}={seed} replays it)")]
    assert _report_through_the_hook(request.node, "passed").sections == []
