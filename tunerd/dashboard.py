"""The daemon's dashboard page: devices, winners (single convs and fused blocks with their plans), jobs with
progress, the miss queue."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2

from tunerd.db.errors import StoreError
from tunerd.db.fingerprint import DeviceFingerprint

if TYPE_CHECKING:
    from .api.state import Service

TEMPLATES = Path(__file__).parent / "templates"


def version() -> str:
    from . import __version__

    return __version__


_env_lock = threading.Lock()
_env: jinja2.Environment | None = None


def _templates() -> jinja2.Environment:
    global _env
    with _env_lock:
        if _env is None:
            _env = jinja2.Environment(
                loader=jinja2.FileSystemLoader(str(TEMPLATES)),
                autoescape=jinja2.select_autoescape(["html"]),
                trim_blocks=True,
                lstrip_blocks=True,
                undefined=jinja2.StrictUndefined,
            )
        return _env


def render_dashboard(svc: Service) -> tuple[str, int]:
    """The dashboard page and its status (503 with a banner when the database is down)."""
    ctx: dict[str, Any] = {
        "version": version(),
        "this_device": svc.device,
        "worker": None,
        "error": None,
        "devices": [],
        "winners": [],
        "block_winners": [],
        "refused_blocks": [],
        "jobs": [],
        "misses": [],
        "snapshots": [],
        "queue_depth": None,
        "queued_tasks": None,
        "trials": {},
    }
    if svc.worker is not None:
        ctx["worker"] = svc.worker.status()
    status = 200
    try:
        ctx["devices"] = svc.store.devices()
        ctx["winners"] = svc.store.winners()[:500]
        ctx["block_winners"] = svc.store.block_winners(refused=ctx["refused_blocks"])[:500]
        ctx["jobs"] = svc.store.jobs(50)
        ctx["misses"] = svc.store.top_misses(25)
        ctx["snapshots"] = svc.store.snapshots()[-10:]
        ctx["queue_depth"] = svc.store.queue_depth()
        ctx["queued_tasks"] = svc.store.queued_tasks()
        ctx["trials"] = svc.store.trial_counts()
    except StoreError as e:
        ctx["error"] = f"{type(e).__name__}: {e}"
        status = 503
    digests = {d.key: d.fingerprint for d in ctx["devices"]}
    ctx["describe_device"] = lambda key: (
        digests[key].describe() if key in digests else DeviceFingerprint.from_key(key).describe()
    )
    ctx["progress_of"] = _progress_fraction
    return _templates().get_template("dashboard.html").render(**ctx), status


def _progress_fraction(job: Any) -> float | None:
    """0..1 from a job's progress (tunerd.tuning.run_job: spec i of n, trials done of total), if it says."""
    if job.status == "done":
        return 1.0
    p = job.progress or {}

    def num(name: str) -> float | None:
        v = p.get(name)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

    within = None
    trials_done, trials_total = num("trials_done"), num("trials_total")
    if trials_done is not None and trials_total:
        within = min(1.0, trials_done / trials_total)
    spec_index, specs = num("spec_index"), num("specs")
    if spec_index is not None and specs:
        return max(0.0, min(1.0, (spec_index + (within or 0.0)) / specs))
    specs_done, specs_total = num("specs_done"), num("specs_total")
    if specs_done is not None and specs_total:
        return max(0.0, min(1.0, specs_done / specs_total))
    tasks_done, tasks_total = num("tasks_done"), num("tasks_total")  # a job fanned out over a fleet
    if tasks_done is not None and tasks_total:
        return max(0.0, min(1.0, tasks_done / tasks_total))
    return within
