import logging
import os
import threading
from pathlib import Path

import pytest
import torch

from tutorial_api import create_app
from tutorial_api.engine.thread_policy import (
    FIRST_WAIT,
    LONGEST_WAIT,
    TRIAL_STEPS,
    ThreadPolicy,
    release_openmp_threads,
)


def quiet(threads, batch):
    """a machine with every core free: more threads are faster, a little."""
    return 0.05 * batch**0.5 * (1 + 1 / threads)


def one_core_busy(cores):
    """`cores` cores, one kept busy by another program: a thread beyond the free ones spins, 40
    times slower.
    """

    def seconds(threads, batch):
        return quiet(threads, batch) * (40 if threads >= cores else 1)

    return seconds


class Run:
    """a policy deciding each step's thread count from the step times a fake machine gives."""

    def __init__(self, most):
        self.policy = ThreadPolicy(most)
        self.threads = most
        self.counts: list[int] = []
        self.seconds: list[float] = []

    def decode(self, machine, steps, batch=8):
        for _ in range(steps):
            seconds = machine(self.threads, batch)
            self.counts.append(self.threads)
            self.seconds.append(seconds)
            self.threads = self.policy.decoded(batch, seconds)
        return self

    def time_at(self, threads, since=0) -> float:
        return sum(
            s
            for n, s in zip(self.counts[since:], self.seconds[since:], strict=False)
            if n == threads
        )


def test_a_quiet_machine_keeps_every_thread_and_checks_rarely():
    run = Run(2).decode(quiet, 5000)
    assert run.threads == 2
    assert run.counts.count(1) / len(run.counts) < 0.01
    assert "1, 1" not in str(run.counts), (
        "a check of fewer threads took more than the one step that settles it"
    )


def test_fewer_threads_must_be_clearly_faster():
    """At one request, a thread more or less makes little difference: noise must not take the second
    away.
    """
    run = Run(2).decode(lambda threads, batch: 0.04 if threads == 2 else 0.036, 2000, batch=1)
    assert run.threads == 2


def test_a_busy_core_is_given_up_within_a_few_steps(caplog):
    run = Run(2).decode(quiet, 100)
    started = len(run.counts)
    with caplog.at_level(logging.INFO, logger="tutorial_api.engine.thread_policy"):
        run.decode(one_core_busy(2), 2 * TRIAL_STEPS + 1)
    assert run.threads == 1
    assert run.counts[started:].count(2) <= TRIAL_STEPS
    assert (
        "CPU threads for decoding: 1 instead of 2" in caplog.text and "steps slowed" in caplog.text
    )


def test_while_the_core_stays_busy_checking_for_it_costs_little():
    run = Run(2).decode(quiet, 100).decode(one_core_busy(2), 10)
    since = len(run.counts)
    run.decode(one_core_busy(2), 20000)
    assert run.threads == 1
    # Each check of two threads costs one step at most, and the checks come ever more rarely.
    assert run.time_at(2, since) < 0.1 * run.time_at(1, since)
    assert run.time_at(2, since + 10000) < 0.05 * run.time_at(1, since + 10000)


def test_the_thread_comes_back_once_the_core_is_free():
    run = Run(2).decode(quiet, 100).decode(one_core_busy(2), 20000)
    freed = len(run.counts)
    run.decode(quiet, 10000)
    assert run.threads == 2
    assert sum(run.seconds[freed : run.counts.index(2, freed)]) <= LONGEST_WAIT + 1


def test_contention_starting_while_idle_is_found_later():
    """no fast steps to compare with: the routine check, within the first wait, finds it."""
    run = Run(2).decode(one_core_busy(2), 1000)
    assert run.threads == 1
    assert sum(run.seconds[: run.counts.index(1)]) <= FIRST_WAIT[-1] + TRIAL_STEPS * max(
        run.seconds
    )


def test_a_larger_machine_gives_up_only_the_busy_cores():
    def three_busy(threads, batch):
        return quiet(threads, batch) * (40 if threads > 5 else 1)

    run = Run(8).decode(quiet, 100).decode(three_busy, 2000)
    assert run.threads == 5


def test_a_trial_is_dropped_when_the_batch_size_changes():
    """Steps of different batch sizes do not compare: a batch growing mid-trial is no evidence
    against a count.
    """
    policy = ThreadPolicy(2)
    for _ in range(TRIAL_STEPS):
        policy.decoded(1, 0.01)
    assert [policy.decoded(1, 0.05) for _ in range(2)] == [
        2,
        1,
    ]  # slowed: a trial at one thread begins
    assert policy.decoded(16, 0.5) == 2  # 16 rows take longer whatever the count
    assert policy.threads == 2


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def on_a_thread_of_its_own(work):
    """Run `work(counts)` on a new thread, whose OpenMP pool the test's own thread never shares; its
    counts.
    """
    counts = {}
    thread = threading.Thread(target=work, args=(counts,))
    thread.start()
    thread.join()
    return counts


def compute_in_parallel():
    torch.set_num_threads(2)
    torch.ones(4_000_000).add_(1)  # long enough for torch to split it across its OpenMP threads


MAPS = Path("/proc/self/maps")
gnu_openmp = pytest.mark.skipif(
    not MAPS.is_file() or "libgomp" not in MAPS.read_text(),
    reason="counts a Linux process's threads, with torch on GNU OpenMP",
)


@gnu_openmp
def test_a_thread_gives_back_its_openmp_threads():
    """A thread gives back its OpenMP threads, and starts new ones when it computes again."""

    def work(counts):
        compute_in_parallel()
        counts["computing"] = os_threads()
        release_openmp_threads()
        counts["released"] = os_threads()
        compute_in_parallel()
        counts["again"] = os_threads()

    counts = on_a_thread_of_its_own(work)
    assert counts["released"] == counts["computing"] - 1
    assert counts["again"] == counts["computing"]


@gnu_openmp
def test_create_app_gives_back_the_callers_openmp_threads(tiny):
    """The thread that hands a loaded model to create_app gives back its OpenMP threads."""

    def work(counts):
        compute_in_parallel()
        counts["computing"] = os_threads()
        create_app(tiny)
        counts["created"] = os_threads()

    counts = on_a_thread_of_its_own(work)
    assert counts["created"] == counts["computing"] - 1
