"""How many CPU threads the engine decodes with, chosen by timing its own decoding steps.

All the threads torch starts with while the cores are free, fewer while other programs keep some
busy. torch's OpenMP threads wait for each other by spinning: when another program holds a core,
every step waits for a thread that is not running, and decoding gets many times slower.
Environment variables (`OMP_WAIT_POLICY`) fix that only before torch starts, and cost speed on a
quiet machine; timing the steps works at run time, anywhere.
"""

import ctypes
import logging
import os
from dataclasses import dataclass, field
from statistics import median

logger = logging.getLogger(__name__)

# Steps timed at one thread count before two counts are compared, by their median.
TRIAL_STEPS = 3
# Fewer threads must be this much faster to be kept: more than the noise between steps, so a quiet
# machine keeps its speed, and far less than what a busy core or a second OpenMP pool costs.
FEWER_MUST_GAIN = 1.2
# More threads are taken back unless they are this much slower: every core counts at large batches.
MORE_MAY_LOSE = 1.1
# Steps this much slower than the fastest seen at the same thread count and batch size mean another
# program has started: fewer threads are tried at once. A step with one thread more that is this
# much slower ends its trial.
SLOWDOWN = 2.0
# Decoding seconds before the first routine trial of fewer threads (-1) and of more (+1), each wait
# doubled after a trial that changes nothing. Fewer threads cost little to try on a quiet machine;
# more cost one slow step while a core is busy, but a long wait keeps a freed core idle.
FIRST_WAIT = {-1: 1.0, 1: 5.0}
LONGEST_WAIT = 320.0


@dataclass
class _Trial:
    """A few steps timed at another thread count."""

    threads: int
    baseline: float  # the median step at the current count, just before
    why: str
    steps: list[float] = field(default_factory=list)


class ThreadPolicy:
    """Thread count between 1 and `most`, chosen from the seconds each decoding step takes.

    Now and then it times a few steps with half the threads or one more, at the same batch size,
    and keeps the faster count. Halving first, then adding back one at a time, finds the free cores
    even when several are busy.
    """

    def __init__(self, most: int):
        """Start with `most` threads."""
        self.most = most
        self.threads = most
        self._batch = 0
        self._recent: list[float] = []  # the latest steps at this count and batch size
        # (threads, batch size): the fastest median seen
        self._fastest: dict[tuple[int, int], float] = {}
        self._trial: _Trial | None = None
        self._clock = 0.0  # seconds spent decoding so far: time while idle is no evidence
        self._wait = dict(FIRST_WAIT)
        self._due = dict(FIRST_WAIT)

    def decoded(self, batch_size: int, seconds: float) -> int:
        """Record one decoding step of `batch_size` rows; return the thread count for the next."""
        self._clock += seconds
        if batch_size != self._batch:  # only steps of one batch size compare
            self._batch, self._recent = batch_size, []
            if self._trial:  # this step ran at the trial's count: evidence for neither
                self._trial = None
                return self.threads
        elif self._trial:
            return self._go_on_with_trial(seconds)
        self._recent = [*self._recent, seconds][-TRIAL_STEPS:]
        if len(self._recent) < TRIAL_STEPS:
            return self.threads
        typical = median(self._recent)
        key = (self.threads, batch_size)
        fastest = self._fastest[key] = min(self._fastest.get(key, typical), typical)
        if self.threads > 1 and typical > SLOWDOWN * fastest:
            why = f"steps slowed from {fastest * 1000:.0f} to {typical * 1000:.0f} ms"
            self._trial = _Trial(self.threads // 2, typical, why)
        elif self.threads > 1 and self._clock >= self._due[-1]:
            self._trial = _Trial(self.threads // 2, typical, "a routine check")
        elif self.threads < self.most and self._clock >= self._due[1]:
            self._trial = _Trial(self.threads + 1, typical, "a routine check")
        return self._trial.threads if self._trial else self.threads

    def _go_on_with_trial(self, seconds: float) -> int:
        """Record one step of the trial; end it once it is settled, and return the next count."""
        trial = self._trial
        trial.steps.append(seconds)
        direction = 1 if trial.threads > self.threads else -1
        # One step can settle it: a trial costs a quiet machine one step, a busy one one slow step.
        if direction < 0:
            hopeless = seconds >= trial.baseline
        else:
            hopeless = seconds > SLOWDOWN * trial.baseline
        if len(trial.steps) < TRIAL_STEPS and not hopeless:
            return trial.threads
        tried = median(trial.steps)
        if direction > 0:
            better = not hopeless and tried < MORE_MAY_LOSE * trial.baseline
        else:
            better = not hopeless and tried * FEWER_MUST_GAIN < trial.baseline
        if better:
            logger.info(
                "CPU threads for decoding: %d instead of %d, as a step of %d requests takes "
                "%.0f ms instead of %.0f ms (tried after %s)",
                trial.threads,
                self.threads,
                self._batch,
                tried * 1000,
                trial.baseline * 1000,
                trial.why,
            )
            self.threads = trial.threads
            self._wait = dict(FIRST_WAIT)
            # Keep going the same way while it helps; back only after a while.
            self._due = {direction: self._clock, -direction: self._clock + FIRST_WAIT[-direction]}
        else:
            logger.debug(
                "CPU threads for decoding: kept %d, as a step of %d requests with %d took %.0f ms "
                "against %.0f ms",
                self.threads,
                self._batch,
                trial.threads,
                tried * 1000,
                trial.baseline * 1000,
            )
            # Steps are this slow now, for whatever reason.
            self._fastest[(self.threads, self._batch)] = trial.baseline
            self._wait[direction] = min(2 * self._wait[direction], LONGEST_WAIT)
            self._due[direction] = self._clock + self._wait[direction]
        self._trial, self._recent = None, []
        return self.threads


def release_openmp_threads() -> None:
    """Give back the calling thread's OpenMP threads, where torch uses GNU OpenMP (Linux).

    Each thread that runs torch's CPU work in parallel keeps its own pool of OpenMP threads, and
    starts a new one if it computes again. Once a process holds more of them than it has cores, GNU
    OpenMP stops spinning while its threads wait for each other, and every step of the engine's
    worker pays for waking them. A thread that hands a model to the engine calls this.
    """
    try:
        # RTLD_NOLOAD: only the copy torch has loaded, never another.
        libgomp = ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        pause = libgomp.omp_pause_resource_all
    except (OSError, AttributeError):
        # Not loaded, no RTLD_NOLOAD on this platform, or older than OpenMP 5.
        return
    pause(1)  # omp_pause_soft: this thread's pool ends; torch's settings stay
