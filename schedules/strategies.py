"""Search strategies: which candidates to measure, and how long, within a budget.

Every strategy has one interface, `Strategy(seed, prior=None, reps=10).search(candidates,
measure, budget) -> list[Trial]`, where `measure(schedule, reps) -> Trial` (a harness call, a
replayed table or a synthetic function in tests) and `budget` limits measure calls and/or
seconds. Strategies are seeded and deterministic for a deterministic `measure`. A measure
object may offer `prefetch(schedules)`: strategies announce what they will measure next so a
GPU harness can compile ahead in parallel.

- exhaustive: the candidates in order;
- random: a seeded permutation;
- halving: successive halving: short runs (few reps) for a random sample, the best 1/eta
  re-measured with eta x more reps, until one is left;
- model: the cost model's order (`prior`: schedule -> predicted seconds), best first;
- tpe: optuna's TPE over the knobs (optuna imported lazily: not installed on GPU boxes), each
  proposal snapped to the nearest unmeasured legal candidate;
- evolution: a population seeded with the prior's best, tournament selection, knob-wise
  crossover and one-step mutations screened by the prior.
"""

from __future__ import annotations

import importlib.util
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Protocol

from tunerd.kernels.schedule import Schedule

from .trial import Trial

Prior = Callable[[Schedule], float]
KNOBS: tuple[str, ...] = tuple(f.name for f in fields(Schedule))


class Measure(Protocol):
    def __call__(self, schedule: Schedule, reps: int) -> Trial: ...


@dataclass
class Budget:
    """Stop after `trials` measure calls and/or `seconds` of wall time (None: no limit)."""

    trials: int | None = None
    seconds: float | None = None
    clock: Callable[[], float] = time.monotonic
    used: int = field(default=0, init=False)
    _start: float | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.trials is not None and (not isinstance(self.trials, int) or self.trials < 1):
            raise ValueError(f"budget trials must be a positive int or None, got {self.trials!r}")
        if self.seconds is not None and not self.seconds > 0:
            raise ValueError(f"budget seconds must be positive or None, got {self.seconds!r}")

    def start(self) -> None:
        if self._start is None:
            self._start = self.clock()

    @property
    def elapsed(self) -> float:
        return 0.0 if self._start is None else self.clock() - self._start

    def exhausted(self) -> bool:
        if self.trials is not None and self.used >= self.trials:
            return True
        return self.seconds is not None and self.elapsed >= self.seconds

    def charge(self) -> None:
        self.used += 1

    @property
    def remaining_trials(self) -> int | None:
        return None if self.trials is None else max(0, self.trials - self.used)


class _Run:
    """One search's bookkeeping: budget checks, the trial log, what was measured."""

    def __init__(self, measure: Measure, budget: Budget) -> None:
        self.measure_fn = measure
        self.budget = budget
        self.trials: list[Trial] = []
        self.measured: dict[Schedule, Trial] = {}
        budget.start()

    @property
    def done(self) -> bool:
        return self.budget.exhausted()

    def measure(self, s: Schedule, reps: int) -> Trial | None:
        """Measure unless the budget is spent (None then)."""
        if self.budget.exhausted():
            return None
        t = self.measure_fn(s, reps)
        self.budget.charge()
        self.trials.append(t)
        self.measured[s] = t
        return t

    def prefetch(self, schedules: Sequence[Schedule]) -> None:
        fn = getattr(self.measure_fn, "prefetch", None)
        if fn is not None and schedules:
            n = self.budget.remaining_trials
            fn(list(schedules if n is None else schedules[:n]))


class Strategy(ABC):
    name: ClassVar[str]
    uses_prior: ClassVar[bool] = False
    requires: ClassVar[str | None] = None  # an optional package the strategy imports lazily

    def __init__(self, seed: int = 0, prior: Prior | None = None, reps: int = 10) -> None:
        if reps < 1:
            raise ValueError(f"reps must be >= 1, got {reps}")
        self.seed = seed
        self.prior = prior
        self.reps = reps

    def search(self, candidates: Sequence[Schedule], measure: Measure, budget: Budget) -> list[Trial]:
        """Measure candidates until done or out of budget; every trial, in order."""
        cands = list(dict.fromkeys(candidates))
        if not cands:
            return []
        run = _Run(measure, budget)
        self._search(cands, run, random.Random(self.seed))
        return run.trials

    @abstractmethod
    def _search(self, cands: list[Schedule], run: _Run, rng: random.Random) -> None: ...

    def _ranked(self, cands: list[Schedule]) -> list[Schedule]:
        """Candidates by the prior's prediction (stable); unchanged without a prior."""
        if self.prior is None:
            return list(cands)
        return sorted(cands, key=self.prior)


def _sequential(order: list[Schedule], run: _Run, reps: int) -> None:
    run.prefetch(order)
    for s in order:
        if run.measure(s, reps) is None:
            return


class Exhaustive(Strategy):
    name = "exhaustive"

    def _search(self, cands: list[Schedule], run: _Run, rng: random.Random) -> None:
        _sequential(cands, run, self.reps)


class RandomSearch(Strategy):
    name = "random"

    def _search(self, cands: list[Schedule], run: _Run, rng: random.Random) -> None:
        order = list(cands)
        rng.shuffle(order)
        _sequential(order, run, self.reps)


class ModelRanked(Strategy):
    """Measure in the cost model's order: a strong baseline when the model ranks well."""

    name = "model"
    uses_prior = True

    def _search(self, cands: list[Schedule], run: _Run, rng: random.Random) -> None:
        if self.prior is None:
            raise ValueError("the 'model' strategy needs a prior (the cost model)")
        _sequential(self._ranked(cands), run, self.reps)


class SuccessiveHalving(Strategy):
    """Rung r measures its survivors with min_reps * eta**r repetitions (at most reps)."""

    name = "halving"

    def __init__(
        self, seed: int = 0, prior: Prior | None = None, reps: int = 10, eta: int = 3, min_reps: int = 1
    ) -> None:
        super().__init__(seed, prior, reps)
        if eta < 2 or min_reps < 1:
            raise ValueError("eta must be >= 2 and min_reps >= 1")
        self.eta = eta
        self.min_reps = min(min_reps, reps)

    def _search(self, cands: list[Schedule], run: _Run, rng: random.Random) -> None:
        order = list(cands)
        rng.shuffle(order)
        n0 = len(order)
        if run.budget.trials is not None:  # n0 + n0/eta + n0/eta^2 + ... <= trials
            n0 = max(1, min(n0, math.floor(run.budget.trials * (1 - 1 / self.eta))))
        survivors = order[:n0]
        rung = 0
        while survivors and not run.done:
            reps = min(self.reps, self.min_reps * self.eta**rung)
            run.prefetch(survivors)
            scored: list[tuple[float, int, Schedule]] = []
            for i, s in enumerate(survivors):
                t = run.measure(s, reps)
                if t is None:
                    return
                scored.append((t.cost, i, s))
            if reps >= self.reps:  # the full-length rung decides
                return
            scored.sort()
            survivors = [s for cost, _, s in scored[: max(1, len(scored) // self.eta)] if cost < math.inf]
            rung += 1


def knob_values(cands: list[Schedule]) -> dict[str, list[Any]]:
    """The values each knob takes among the candidates (only knobs that vary)."""
    values: dict[str, list[Any]] = {}
    for k in KNOBS:
        vs = sorted({getattr(s, k) for s in cands}, key=lambda v: (isinstance(v, str), v))
        if len(vs) > 1:
            values[k] = vs
    return values


def distance(a: Schedule, b: Schedule) -> float:
    """Knob distance: |log2 ratio| per numeric knob, 1 per differing k_order or space_to_depth (or stream_k on / off:
    0 is off)."""
    d = 0.0
    for k in KNOBS:
        x, y = getattr(a, k), getattr(b, k)
        if x != y:
            d += 1.0 if isinstance(x, (str, bool)) or min(x, y) <= 0 else abs(math.log2(x / y))
    return d


def nearest(target: Schedule, pool: Sequence[Schedule]) -> Schedule:
    """The pool's closest schedule to target (first on ties)."""
    return min(pool, key=lambda s: distance(target, s))


def _with(s: Schedule, **knobs: Any) -> Schedule:
    d = s.to_dict()
    d.update(knobs)
    return Schedule(**d)


class TPE(Strategy):
    """optuna's Tree-structured Parzen Estimator over the knobs that vary."""

    name = "tpe"
    requires = "optuna"
    uses_prior = True  # the model's favourite is the first trial

    def __init__(self, seed: int = 0, prior: Prior | None = None, reps: int = 10, startup: int | None = None) -> None:
        super().__init__(seed, prior, reps)
        self.startup = startup

    def _search(self, cands: list[Schedule], run: _Run, rng: random.Random) -> None:
        try:
            import optuna  # lazily: not on the GPU boxes
        except ImportError:
            raise RuntimeError(
                "the 'tpe' strategy needs optuna (pip install optuna); "
                "'evolution' is the model-guided alternative without it"
            ) from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        values = knob_values(cands)
        dists: dict[str, optuna.distributions.BaseDistribution] = {
            k: optuna.distributions.CategoricalDistribution(v) for k, v in values.items()
        }
        startup = self.startup or max(3, min(10, len(cands) // 10))
        sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=startup)
        study = optuna.create_study(direction="minimize", sampler=sampler)
        if self.prior is not None:  # start from the model's favourite
            study.enqueue_trial({k: getattr(self._ranked(cands)[0], k) for k in values})
        pending = dict.fromkeys(cands)  # ordered: set order would vary with PYTHONHASHSEED
        worst = 0.0
        while pending and not run.done:
            ot = study.ask(dists)
            proposal = _with(cands[0], **ot.params)
            s = proposal if proposal in pending else nearest(proposal, list(pending))
            t = run.measure(s, self.reps)
            if t is None:
                break
            del pending[s]
            if t.cost < math.inf:
                worst = max(worst, t.cost)
            value = t.cost if t.cost < math.inf else (worst * 10 if worst else 1e9)
            if s == proposal:
                study.tell(ot, value)
            else:  # TPE learns from what was measured, not from the illegal/duplicate proposal
                study.tell(ot, state=optuna.trial.TrialState.FAIL)
                study.add_trial(
                    optuna.trial.create_trial(
                        params={k: getattr(s, k) for k in values}, distributions=dists, value=value
                    )
                )


class Evolution(Strategy):
    """Steady-state evolution seeded by the cost model.

    The first population is the prior's best half plus a random half; each child comes from a
    tournament-selected parent (crossed with a second one half of the time), mutated one knob
    one step, snapped to the nearest unmeasured candidate; with a prior, the best-predicted of
    `screen` such children is measured.
    """

    name = "evolution"
    uses_prior = True

    def __init__(
        self, seed: int = 0, prior: Prior | None = None, reps: int = 10, population: int = 8, screen: int = 4
    ) -> None:
        super().__init__(seed, prior, reps)
        if population < 2 or screen < 1:
            raise ValueError("population must be >= 2 and screen >= 1")
        self.population = population
        self.screen = screen

    def _search(self, cands: list[Schedule], run: _Run, rng: random.Random) -> None:
        values = knob_values(cands)
        index = {s: i for i, s in enumerate(cands)}
        pending = dict.fromkeys(cands)
        size = min(self.population, len(cands))
        ranked = self._ranked(cands)
        seeds = ranked[: (size + 1) // 2] if self.prior is not None else []
        chosen = set(seeds)
        rest = [s for s in cands if s not in chosen]
        seeds += rng.sample(rest, min(len(rest), size - len(seeds)))
        run.prefetch(seeds)
        scored: list[tuple[float, int, Schedule]] = []
        for s in seeds:
            t = run.measure(s, self.reps)
            if t is None:
                return
            del pending[s]
            scored.append((t.cost, index[s], s))
        while pending and not run.done:
            pool = sorted(scored)[: max(2, size)]
            children = [self._child(pool, values, list(pending), rng) for _ in range(self.screen)]
            child = min(children, key=self.prior) if self.prior is not None else children[0]
            t = run.measure(child, self.reps)
            if t is None:
                return
            del pending[child]
            scored.append((t.cost, index[child], child))

    def _child(
        self,
        pool: list[tuple[float, int, Schedule]],
        values: dict[str, list[Any]],
        pending: list[Schedule],
        rng: random.Random,
    ) -> Schedule:
        def tournament() -> Schedule:
            a, b = rng.sample(pool, 2) if len(pool) > 1 else (pool[0], pool[0])
            return min(a, b)[2]

        child = tournament()
        if rng.random() < 0.5:
            other = tournament()
            child = _with(child, **{k: getattr(other if rng.random() < 0.5 else child, k) for k in values})
        if values:
            k = rng.choice(sorted(values))
            opts = values[k]
            i = opts.index(getattr(child, k)) if getattr(child, k) in opts else 0
            j = min(len(opts) - 1, max(0, i + rng.choice((-1, 1))))
            child = _with(child, **{k: opts[j]})
        return nearest(child, pending)


# The strategy every entry point uses when none is named: ranked best by the replay benchmark
# (python -m tunerd.schedules.replay) and needs no optuna, so it runs on a bare GPU box.
DEFAULT = "model"

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Exhaustive, RandomSearch, SuccessiveHalving, ModelRanked, TPE, Evolution)
}


def available(name: str) -> bool:
    """Whether a registered strategy's optional dependency is installed (optuna for 'tpe')."""
    req = STRATEGIES[name].requires
    return req is None or importlib.util.find_spec(req) is not None


def make(name: str, **options: Any) -> Strategy:
    """A strategy by registry name; a clear error for unknown names."""
    cls = STRATEGIES.get(name)
    if cls is None:
        raise ValueError(f"unknown strategy {name!r}; choose one of {sorted(STRATEGIES)}")
    return cls(**options)
