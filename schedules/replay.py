"""Replay: record complete timing tables, then compare search strategies offline on them.

A table holds every legal schedule of one spec (space(..., max_candidates=None)) with its
measured status and timings. Replaying runs each strategy against the table instead of the
device: measure(schedule, reps) returns the recorded median, perturbed by seeded log-normal
noise whose width comes from the recorded per-repetition p10/p90 spread and shrinks with
sqrt(reps) (the noise of a median of reps repetitions), so short
runs (successive halving's first rungs) are noisier than long ones. A strategy's result is the
true (recorded) time of the variant it would pick; quality = exhaustive best / that time.

    python -m tunerd.schedules.replay benchmarks/tables/*.json --out report.json   # replay, print a table
    python -m tunerd.schedules.replay --record --tables-dir benchmarks/tables       # record TABLE_SPECS here

On a GPU, --record takes GPU_TABLE_SPECS (realistic layer sizes; their full spaces hold a thousand
candidates or more), and --sample N / --time-limit S bound it: candidates are measured in a seeded
random order, so a table cut short holds a uniform sample of its space (`complete: false`, with
`space_size`); replaying it treats the sample as the space.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tunerd.kernels.generator import GENERATOR_VERSION
from tunerd.kernels.runtime import atomic_write_text
from tunerd.kernels.schedule import Schedule
from tunerd.kernels.spec import BlockSpec, Epilogue, conv_spec

from . import cost
from .device import INTERPRETER_NAME, DeviceLimits
from .harness import Harness
from .space import space
from .strategies import STRATEGIES, Budget, available, make
from .trial import Trial, best_of

TABLE_FORMAT = "tunerd-timing-table/1"
INTERPRETER_NOTE = (
    "Recorded on the Triton interpreter (CPU): times are dominated by Python/numpy overhead per "
    "program and per reduction step, a weak proxy of GPU timings. Use these tables to test "
    "search strategies, not to pick GPU schedules."
)
# Tiny specs whose whole interpreter space records in a few minutes on 2 CPU cores.
TABLE_SPECS: tuple[BlockSpec, ...] = (
    conv_spec(n=2, c=16, k=32, in_size=(8, 8), kernel=3, padding=1, epilogue=Epilogue(bias=True, activation="relu")),
    conv_spec(n=2, c=32, k=32, in_size=(64,), kernel=5, padding=2),
    conv_spec(n=2, c=32, k=32, in_size=(8, 8), kernel=3, padding=1, groups=32),
)
# Real layer sizes for GPU tables (bf16): ResNet-50's 3x3, ConvNeXt-T's MLP 1x1 and its depthwise 7x7.
GPU_TABLE_SPECS: tuple[BlockSpec, ...] = (
    conv_spec(n=32, c=128, k=128, in_size=(28, 28), kernel=3, padding=1, dtype="bfloat16"),
    conv_spec(n=32, c=192, k=768, in_size=(28, 28), kernel=1, dtype="bfloat16"),
    conv_spec(n=32, c=192, k=192, in_size=(28, 28), kernel=7, padding=3, groups=192, dtype="bfloat16"),
)


@dataclass
class Table:
    """Every candidate of one spec on one device, measured."""

    spec: BlockSpec
    device: str
    limits: DeviceLimits
    trials: dict[Schedule, Trial]
    note: str = ""
    reps: int = 1
    space_size: int | None = None  # candidates in the spec's full space (None: the table holds all of them)

    @property
    def complete(self) -> bool:
        return self.space_size is None or len(self.trials) >= self.space_size

    @property
    def best(self) -> Trial:
        b = best_of(list(self.trials.values()))
        if b is None:
            raise ValueError(f"table for {self.spec.describe()} has no ok entry")
        return b

    def to_dict(self) -> dict[str, Any]:
        keep = ("status", "median_ms", "p10_ms", "p90_ms", "reps", "variant_id", "rel_error")
        rows = [{"schedule": s.to_dict(), **{k: getattr(t, k) for k in keep}} for s, t in self.trials.items()]
        return {
            "format": TABLE_FORMAT,
            "spec": self.spec.to_dict(),
            "device": self.device,
            "limits": self.limits.to_dict(),
            "generator_version": GENERATOR_VERSION,
            "note": self.note,
            "reps": self.reps,
            "candidates": len(rows),
            "space_size": self.space_size or len(rows),
            "complete": self.complete,
            "entries": rows,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Table:
        if d.get("format") != TABLE_FORMAT:
            raise ValueError(f"not a timing table (format {d.get('format')!r}, expected {TABLE_FORMAT!r})")
        lim = {k: v for k, v in d["limits"].items() if k in {f.name for f in fields(DeviceLimits)}}
        lim["capability"] = tuple(lim.get("capability", (9, 0)))
        trials = {}
        for row in d["entries"]:
            s = Schedule.from_dict(row["schedule"])
            trials[s] = Trial(
                schedule=s,
                variant_id=row.get("variant_id", ""),
                source="",
                status=row["status"],
                median_ms=row.get("median_ms"),
                p10_ms=row.get("p10_ms"),
                p90_ms=row.get("p90_ms"),
                reps=row.get("reps", 0),
                rel_error=row.get("rel_error"),
                device=d["device"],
            )
        return cls(
            spec=BlockSpec.from_dict(d["spec"]),
            device=d["device"],
            limits=DeviceLimits(**lim),
            trials=trials,
            note=d.get("note", ""),
            reps=d.get("reps", 1),
            space_size=d.get("space_size"),
        )

    def save(self, path: Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> Table:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{path}: not a readable timing table ({e})") from None


def record(
    spec: BlockSpec,
    harness: Harness,
    limits: DeviceLimits | None = None,
    reps: int | None = None,
    on_trial: Callable[[Trial], None] | None = None,
    sample: int | None = None,
    seed: int = 0,
    deadline: float | None = None,
) -> Table:
    """Measure every legal schedule of spec (no cap) into a table, in a seeded random order.

    sample: at most this many candidates (a uniform sample of the space); deadline: time.monotonic()
    after which no further candidate starts. Either leaves a table with complete == False.
    """
    limits = limits or DeviceLimits.detect()
    candidates = space(spec, limits, max_candidates=None)
    order = random.Random(f"{seed}:{spec.key}").sample(candidates, min(sample or len(candidates), len(candidates)))
    ahead = 16  # GPU: compiles run in parallel this far ahead of the timing (a deadline wastes little)
    harness.prefetch(spec, order[:ahead])
    trials: dict[Schedule, Trial] = {}
    for i, s in enumerate(order):
        if deadline is not None and trials and time.monotonic() > deadline:
            break
        harness.prefetch(spec, order[i + ahead : i + ahead + 1])
        t = harness.measure(spec, s, reps)
        trials[s] = t
        if on_trial is not None:
            on_trial(t)
    return Table(
        spec=spec,
        device=harness.device_name,
        limits=limits,
        trials=trials,
        note=INTERPRETER_NOTE if limits.interpreted else "",
        reps=reps or harness.reps,
        space_size=len(candidates),
    )


class ReplayMeasure:
    """measure(schedule, reps) answered from a table with seeded, reps-dependent noise."""

    def __init__(self, table: Table, seed: int = 0, noise: bool = True) -> None:
        self.table = table
        self.rng = random.Random(seed)
        self.noise = noise

    def __call__(self, schedule: Schedule, reps: int) -> Trial:
        t = self.table.trials.get(schedule)
        if t is None:
            raise KeyError(f"schedule {schedule.describe()} is not in the table of {self.table.spec.describe()}")
        if not t.ok:
            return t
        median = t.cost  # an ok trial's median
        if self.noise:  # the median of `reps` repetitions: ~1.25 sigma / sqrt(reps) for normal noise
            median *= math.exp(self.rng.gauss(0.0, 1.2533 * self._sigma(t) / math.sqrt(max(1, reps))))
        return t.with_(median_ms=median, reps=reps)

    @staticmethod
    def _sigma(t: Trial) -> float:
        """Relative standard deviation of one repetition, from the recorded p10..p90 spread."""
        if t.spread_ms is None or not t.median_ms:
            return 0.0
        return t.spread_ms / (2 * 1.2816 * t.median_ms)


BLIND = "-blind"  # suffix: a model-guided strategy run without the cost model, to test the search itself


def run_strategy(table: Table, name: str, seed: int, trials: int, noise: bool = True) -> dict[str, Any]:
    """One replayed search: the true time of the variant it picks, and its quality."""
    spec, limits = table.spec, table.limits
    blind = name.endswith(BLIND)
    prior = None if blind else (lambda s: cost.predict(spec, s, limits))
    strat = make(name.removesuffix(BLIND), seed=seed, prior=prior, reps=max(1, table.reps))
    measure = ReplayMeasure(table, seed=seed, noise=noise)
    found = strat.search(list(table.trials), measure, Budget(trials=trials))
    pick = best_of(found)
    true_ms = table.trials[pick.schedule].cost if pick is not None else math.inf
    return {"trials": len(found), "picked_ms": true_ms, "quality": table.best.cost / true_ms}


def replay(
    tables: Sequence[Table],
    strategies: Sequence[str] | None = None,
    seeds: int = 5,
    fractions: Sequence[float] = (0.05, 0.1, 0.2, 0.3, 0.5),
    target_fraction: float = 0.2,
    target_quality: float = 0.97,
    noise: bool = True,
    blind: bool = True,
) -> dict[str, Any]:
    """Every strategy on every table at each trial fraction, averaged over seeds.

    blind: also run each prior-using strategy but 'model' without the cost model ('<name>-blind').
    """
    names = list(strategies or [n for n in STRATEGIES if available(n)])
    if blind:
        names += [n + BLIND for n in names if n != "model" and STRATEGIES[n].uses_prior]
    fractions = sorted(set(fractions) | {target_fraction})
    report: dict[str, Any] = {
        "target": {"fraction": target_fraction, "quality": target_quality},
        "seeds": seeds,
        "noise": noise,
        "tables": [],
        "strategies": {},
    }
    for tb in tables:
        report["tables"].append(
            {
                "spec": tb.spec.describe(),
                "device": tb.device,
                "candidates": len(tb.trials),
                "space_size": tb.space_size or len(tb.trials),
                "complete": tb.complete,
                "ok": sum(t.ok for t in tb.trials.values()),
                "best_ms": tb.best.median_ms,
                "note": tb.note,
            }
        )
    for name in names:
        curve = []
        for f in fractions:
            runs = []
            for tb in tables:
                n = max(1, math.ceil(f * len(tb.trials)))
                runs += [run_strategy(tb, name, seed, n, noise) for seed in range(seeds)]
            qs = [r["quality"] for r in runs]
            curve.append(
                {
                    "fraction": f,
                    "mean_quality": sum(qs) / len(qs),
                    "min_quality": min(qs),
                    "mean_trials": sum(r["trials"] for r in runs) / len(runs),
                    "hit_rate": sum(q >= target_quality for q in qs) / len(qs),
                }
            )
        at = next(c for c in curve if c["fraction"] == target_fraction)
        report["strategies"][name] = {"curve": curve, "meets_target": at["mean_quality"] >= target_quality}
    return report


def format_report(report: dict[str, Any]) -> str:
    fr = [c["fraction"] for c in next(iter(report["strategies"].values()))["curve"]]
    lines = [
        f"{len(report['tables'])} tables, {report['seeds']} seeds; mean quality (exhaustive best / picked) "
        f"vs fraction of the space measured; target {report['target']['quality']:.0%} at "
        f"{report['target']['fraction']:.0%}"
    ]
    lines.append(f"{'strategy':<16}" + "".join(f"{f:>8.0%}" for f in fr) + "   min@target  target")
    tf = report["target"]["fraction"]
    for name, r in report["strategies"].items():
        at = next(c for c in r["curve"] if c["fraction"] == tf)
        lines.append(
            f"{name:<16}"
            + "".join(f"{c['mean_quality']:>8.3f}" for c in r["curve"])
            + f"   {at['min_quality']:>10.3f}  {'yes' if r['meets_target'] else 'no'}"
        )
    for t in report["tables"]:
        sampled = "" if t.get("complete", True) else f" (a sample of {t['space_size']})"
        lines.append(
            f"  table: {t['spec']} on {t['device']}: {t['candidates']} candidates{sampled}, {t['ok']} ok, "
            f"best {t['best_ms']:.3g} ms"
        )
    return "\n".join(lines)


def table_path(tables_dir: Path, tb: Table) -> Path:
    kind = "interp" if tb.limits.interpreted else "gpu"
    return Path(tables_dir) / f"{kind}_{tb.spec.kind}{tb.spec.ndim}d_{tb.spec.digest}.json"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tunerd.schedules.replay",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("tables", nargs="*", type=Path, help="timing table JSON files to replay")
    ap.add_argument("--out", type=Path, help="write the JSON report here")
    ap.add_argument(
        "--strategies",
        default=",".join(n for n in STRATEGIES if available(n)),
        help="comma-separated strategy names (default: every installed one)",
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--fraction", type=float, default=0.2, help="trial budget of the target, as a space fraction")
    ap.add_argument("--no-noise", action="store_true", help="replay recorded medians exactly")
    ap.add_argument("--no-blind", action="store_true", help="skip the prior-free runs of model-guided strategies")
    ap.add_argument("--record", action="store_true", help="record timing tables on this device instead")
    ap.add_argument(
        "--specs",
        choices=("interp", "gpu"),
        help="which specs to record: TABLE_SPECS (interp) or GPU_TABLE_SPECS (default: by device)",
    )
    ap.add_argument("--tables-dir", type=Path, default=Path("benchmarks/tables"))
    ap.add_argument("--reps", type=int, default=None, help="repetitions per recorded candidate")
    ap.add_argument("--timeout", type=float, default=300.0, help="per-candidate timeout when recording (s)")
    ap.add_argument("--sample", type=int, help="record at most N candidates per spec (a seeded uniform sample)")
    ap.add_argument(
        "--time-limit", type=float, help="seconds for the whole recording, shared evenly by the specs not yet recorded"
    )
    ap.add_argument("--seed", type=int, default=0, help="the recording order's seed")
    ns = ap.parse_args(argv)
    if ns.record:
        if ns.sample is not None and ns.sample < 1:
            ap.error("--sample must be >= 1")
        t_start = time.monotonic()
        with Harness(timeout_s=ns.timeout, reps=ns.reps) as h:
            gpu = ns.specs == "gpu" if ns.specs else h.device_name != INTERPRETER_NAME
            specs = GPU_TABLE_SPECS if gpu else TABLE_SPECS
            for i, spec in enumerate(specs):
                t0 = time.monotonic()
                deadline = None
                if ns.time_limit is not None and t0 - t_start >= ns.time_limit:
                    print(f"{spec.describe()}: not recorded (time limit)", flush=True)
                    continue
                if ns.time_limit is not None:
                    deadline = t0 + (ns.time_limit - (t0 - t_start)) / (len(specs) - i)
                tb = record(spec, h, reps=ns.reps, sample=ns.sample, seed=ns.seed, deadline=deadline)
                path = table_path(ns.tables_dir, tb)
                tb.save(path)
                part = "" if tb.complete else f" of {tb.space_size} (incomplete)"
                print(
                    f"{spec.describe()}: {len(tb.trials)}{part} candidates, {sum(t.ok for t in tb.trials.values())} "
                    f"ok, in {time.monotonic() - t0:.0f}s -> {path}",
                    flush=True,
                )
        return 0
    if not ns.tables:
        ap.error("give timing table files to replay, or --record")
    names = [n.strip() for n in ns.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        ap.error(f"unknown strategies {unknown}; choose from {sorted(STRATEGIES)}")
    missing = [n for n in names if not available(n)]
    if missing:
        ap.error(
            f"strategies {missing} need packages that are not installed: "
            + ", ".join(f"{n} needs {STRATEGIES[n].requires}" for n in missing)
        )
    try:
        tables = [Table.load(p) for p in ns.tables]
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = replay(
        tables, names, seeds=ns.seeds, target_fraction=ns.fraction, noise=not ns.no_noise, blind=not ns.no_blind
    )
    print(format_report(report))
    if ns.out:
        atomic_write_text(ns.out, json.dumps(report, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
