"""Report: speedups, roofline fractions and geometric means of a benchmark run; JSON, markdown and PNG out.

A run document is a plain dict (see benchmarks/README.md). Speedup = contender time / tunerd time,
so > 1 means tunerd is faster. Files are written atomically (a reader never sees half a file).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tunerd.kernels.runtime import atomic_write_text

# metric -> (numerator contender, denominator contender, which cases count: plain | fused | all)
SPEEDUPS: dict[str, tuple[str, str, str]] = {
    "tuned_vs_torch": ("torch", "tunerd_tuned", "plain"),
    "tuned_vs_compile": ("torch_compile", "tunerd_tuned", "all"),
    "tuned_vs_unfused": ("torch_unfused", "tunerd_tuned", "fused"),
    "default_vs_torch": ("torch", "tunerd_default", "plain"),
    "tuned_vs_default": ("tunerd_default", "tunerd_tuned", "all"),
}
TUNERD = ("tunerd_tuned", "tunerd_default")
SHORT_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def geomean(values: Iterable[float | None]) -> float | None:
    """Geometric mean of the positive finite values (None when there are none)."""
    xs = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    if not xs:
        return None
    return math.exp(sum(math.log(v) for v in xs) / len(xs))


def median_ms(case: dict[str, Any], contender: str) -> float | None:
    r = case["contenders"].get(contender, {})
    return r.get("median_ms") if r.get("status") == "ok" else None


def case_speedups(case: dict[str, Any]) -> dict[str, float | None]:
    """Each SPEEDUPS metric that applies to this case (None where a contender has no time)."""
    out: dict[str, float | None] = {}
    for metric, (num, den, which) in SPEEDUPS.items():
        if which != "all" and which != ("fused" if case["fused"] else "plain"):
            continue
        a, b = median_ms(case, num), median_ms(case, den)
        out[metric] = a / b if a is not None and b is not None and b > 0 else None
    return out


def by_suite(cases: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Cases grouped by their suite, in first-seen order, then every case under 'all'."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in cases:
        groups.setdefault(c["suite"], []).append(c)
    return {**groups, "all": list(cases)}


def summarize(cases: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per suite (and 'all'): geometric mean and count of every speedup metric, median roofline fraction."""
    out: dict[str, dict[str, Any]] = {}
    for suite, cs in by_suite(cases).items():
        row: dict[str, Any] = {}
        for metric in SPEEDUPS:
            vals = [c["speedups"].get(metric) for c in cs]
            vals = [v for v in vals if v is not None]
            row[metric] = {"geomean": geomean(vals), "n": len(vals)}
        fr = sorted(c["roofline"]["tunerd_tuned"] for c in cs if c.get("roofline", {}).get("tunerd_tuned"))
        row["tuned_roofline_median"] = fr[len(fr) // 2] if fr else None
        row["cases"] = len(cs)
        out[suite] = row
    return out


def summary_text(doc: dict[str, Any]) -> str:
    """A few lines for the console: per-suite geometric means."""
    head = "interpreter results (not GPU numbers)" if doc["device"]["interpreter"] else doc["device"]["name"]
    lines = [f"tunerd speedups (geometric means; contender time / tunerd time), {head}:"]
    for suite, row in doc["summary"].items():
        if not row["cases"]:
            continue
        cells = [f"{m} {_x(row[m]['geomean'])} (n={row[m]['n']})" for m in SPEEDUPS if row[m]["n"]]
        lines.append(f"  {suite}: " + (", ".join(cells) or "no timed pairs"))
    for m in doc.get("e2e", []):
        ms = {k: r["median_ms"] for k, r in m["contenders"].items() if r.get("status") == "ok"}
        cells = [
            f"{k} {v:.4g} ms" + (f" ({ms['eager'] / v:.2f}x eager)" if "eager" in ms and k != "eager" else "")
            for k, v in ms.items()
        ]
        lines.append(f"  e2e {m['model']}: " + (", ".join(cells) or m.get("skipped") or "no timed contender"))
    return "\n".join(lines)


# ---- markdown ------------------------------------------------------------------------------------
def _x(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}x"


def _ms(case: dict[str, Any], name: str) -> str:
    r = case["contenders"].get(name)
    if r is None:
        return ""
    if r.get("status") == "ok":
        return f"{r['median_ms']:.4g}"
    return r.get("status", "?")


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def markdown(doc: dict[str, Any]) -> str:
    dev = doc["device"]
    torch_label = doc["labels"]["torch"]
    lines = [f"# tunerd benchmark: {dev['name']}", ""]
    if dev["interpreter"]:
        lines += [
            "**Triton interpreter results on CPU: these show the benchmark works, they are not GPU "
            "numbers and say nothing about tunerd's speed.**",
            "",
        ]
    lines += [
        f"- created {doc['created']}, {doc['elapsed_s']:.0f} s; torch {dev['torch']}, triton {dev['triton']}, "
        f"CUDA {dev.get('cuda')}, cuDNN {dev.get('cudnn')}",
        f"- `torch` = {torch_label}; `compile` = torch.compile(mode={doc['config']['compile_mode']!r})",
        f"- tuning: {json.dumps(doc['config']['tune'])}",
        f"- timing: {json.dumps(doc['config']['timing'])}, {doc['config']['n_inputs']} rotated input sets",
        f"- peaks: copy {doc['peaks']['copy_gbps']:.1f} GB/s, matmul "
        + ", ".join(f"{k} {v:.2f} TFLOP/s" for k, v in doc["peaks"]["matmul_tflops"].items()),
    ]
    if doc.get("stopped"):
        lines.append(
            f"- **stopped early**: {doc['stopped']['reason']} ({doc['stopped']['cases_not_run']} cases not run)"
        )
    lines += [
        "",
        "## Geometric-mean speedups (contender time / tunerd time; > 1: tunerd faster)",
        "",
        f"| suite | cases | tuned vs {torch_label} | tuned vs compile | tuned vs unfused torch (fused) "
        f"| default vs {torch_label} | tuned vs default | tuned roofline (median) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for suite, row in doc["summary"].items():
        if not row["cases"]:
            continue
        cells = [f"{_x(row[m]['geomean'])} (n={row[m]['n']})" for m in SPEEDUPS]
        roof = _pct(row["tuned_roofline_median"])
        lines.append(f"| {suite} | {row['cases']} | " + " | ".join(cells) + f" | {roof} |")
    lines += [
        "",
        "## Per layer (median ms)",
        "",
        "| suite | # | layer | pass | epilogue | tuned | default | torch | unfused | compile | tuned vs torch "
        "| tuned vs compile | roofline (tuned) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in doc["cases"]:
        s = c["speedups"]
        vs_torch = s.get("tuned_vs_torch") if not c["fused"] else s.get("tuned_vs_unfused")
        name = f"{c['pick']}: {c['name']}" if c.get("pick") else c["name"]
        lines.append(
            f"| {c['suite']} | {c['layer']} | {name} | {c['pass']} | {c['epilogue'] or '-'} | "
            f"{_ms(c, 'tunerd_tuned')} | {_ms(c, 'tunerd_default')} | {_ms(c, 'torch')} | "
            f"{_ms(c, 'torch_unfused')} | {_ms(c, 'torch_compile')} | {_x(vs_torch)} | "
            f"{_x(s.get('tuned_vs_compile'))} | {_pct(c.get('roofline', {}).get('tunerd_tuned'))} |"
        )
    lines += problem_lines(
        doc,
        lambda c: f"{c['suite']}#{c['layer']} {c['pass']} {c['dtype']}" + (f" +{c['epilogue']}" if c["fused"] else ""),
    )
    if doc.get("e2e"):
        lines += [
            "",
            "## End to end: training step (forward + backward + SGD)",
            "",
            "| model | batch | input | contender | step ms | images/s | vs eager | note |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m in doc["e2e"]:
            if m.get("skipped"):
                lines.append(f"| {m['model']} | | | | not run: {m['skipped']} | | | |")
                continue
            eager = m["contenders"].get("eager", {}).get("median_ms")
            for name, r in m["contenders"].items():
                t = r.get("median_ms")
                vs = f"{eager / t:.2f}x" if t and eager and r.get("status") == "ok" else "—"
                ips = f"{m['batch'] / (t * 1e-3):.0f}" if t and r.get("status") == "ok" else "—"
                note = r.get("error") or r.get("reason") or r.get("note") or ""
                lines.append(
                    f"| {m['model']} | {m['batch']} | {m['input']} | {name} | {t:.4g} | {ips} | {vs} | {note} |"
                    if t and r.get("status") == "ok"
                    else f"| {m['model']} | {m['batch']} | {m['input']} | {name} | {r.get('status')} | — | — | {note} |"
                )
    return "\n".join(lines) + "\n"


# ---- plot ----------------------------------------------------------------------------------------
def plot(doc: dict[str, Any], path: Path) -> bool:
    """Bar chart of tuned speedup per layer (vs torch / unfused torch, and vs torch.compile); False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = sorted(
        doc["cases"],
        key=lambda c: (c["suite"], c["layer"], c["dtype"], c["fused"], ("fwd", "dgrad", "wgrad").index(c["pass"])),
    )
    labels = [
        f"{c['suite']}#{c['layer']} {c['pass']} {SHORT_DTYPES.get(c['dtype'], c['dtype'])}"
        + (f" +{c['epilogue']}" if c["fused"] else "")
        for c in cases
    ]
    vs_torch = [c["speedups"].get("tuned_vs_unfused" if c["fused"] else "tuned_vs_torch") for c in cases]
    vs_compile = [c["speedups"].get("tuned_vs_compile") for c in cases]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(cases) + 2), 5))
    xs = range(len(cases))
    w = 0.4
    ax.bar(
        [x - w / 2 for x in xs],
        [v or 0 for v in vs_torch],
        w,
        label=f"vs {doc['labels']['torch']} (unfused torch for fused cases)",
    )
    ax.bar([x + w / 2 for x in xs], [v or 0 for v in vs_compile], w, label="vs torch.compile")
    ax.axhline(1.0, color="black", linewidth=0.8)
    if any(v for v in vs_torch + vs_compile):
        ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=7)
    ax.set_ylabel("speedup of tunerd tuned (x, > 1 faster)")
    title = f"tunerd tuned, per-layer speedup\n{doc['device']['name']}"
    ax.set_title(title + (": interpreter, not GPU numbers" if doc["device"]["interpreter"] else ""), fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    return True


def strict_json(v: Any) -> Any:
    """v with NaN and infinities as strings ("inf", "nan"), so the file is valid JSON for every parser."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: strict_json(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict_json(x) for x in v]
    return v


def problem_lines(doc: dict[str, Any], where: Callable[[dict[str, Any]], str]) -> list[str]:
    """The report's 'Without a time' section (contenders that failed, were wrong or skipped, grouped by reason,
    each with the cases it hit: where(case) names one) and what a time limit left unrun."""
    problems: dict[tuple[str, str, str], list[str]] = {}  # (contender, status, why) -> cases
    for c in doc["cases"]:
        if c.get("error"):
            problems.setdefault(("whole case", "error", c["error"]), []).append(where(c))
        for n, r in c["contenders"].items():
            if r.get("status") != "ok":
                why = r.get("error") or r.get("reason") or f"wrong {r.get('wrong')}, rel_error {r.get('rel_error')}"
                problems.setdefault((n, str(r.get("status", "?")), str(why)), []).append(where(c))
    lines = []
    if problems:
        lines += ["", "## Without a time", ""]
        for (n, status, why), seen in problems.items():
            more = " ..." if len(seen) > 6 else ""
            lines.append(f"- `{n}` {status} in {len(seen)} case(s) ({', '.join(seen[:6])}{more}): {why}")
    if doc.get("stopped"):
        lines += ["", f"Not run ({doc['stopped']['reason']}): " + ", ".join(doc["stopped"]["not_run"])]
    return lines


def write_json(doc: dict[str, Any], path: Path) -> str:
    """doc as strict JSON at path, atomically (the parent folder is made); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(strict_json(doc), indent=1, default=str, allow_nan=False) + "\n")
    return str(path)


def write_files(doc: dict[str, Any], md: str, out_dir: Path) -> list[str]:
    """results.json and report.md (the markdown md) under out_dir, each atomically; returns the paths."""
    write_json(doc, out_dir / "results.json")
    atomic_write_text(out_dir / "report.md", md)
    return [str(out_dir / "results.json"), str(out_dir / "report.md")]


def write(doc: dict[str, Any], out_dir: Path, *, final: bool = True) -> dict[str, str]:
    """results.json and report.md (always), speedup.png when final; returns the paths written."""
    json_path, md_path = write_files(doc, markdown(doc), out_dir)
    paths = {"json": json_path, "markdown": md_path}
    if final and plot(doc, out_dir / "speedup.png"):
        paths["png"] = str(out_dir / "speedup.png")
    return paths
