"""Markdown output: the machine description and one table per scenario (medians over the
repetitions, a column per proxy, and midway's ratio to HAProxy)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench import procs
from bench.proxies import REPO, Proxy
from bench.proxies import describe as describe_proxy
from bench.scenarios import Metric, Scenario, Settings, describe


@dataclass
class Outcome:
    """One measurement: metric values, or the reason it failed."""

    values: dict[str, float] | None
    error: str | None = None
    start_failed: bool = False  # the proxy itself did not start


@dataclass
class ScenarioResults:
    scenario: Scenario
    proxies: list[Proxy]  # table columns, in display order
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)  # proxy name -> runs
    notes: list[str] = field(default_factory=list)

    def add(self, proxy: Proxy, outcome: Outcome) -> None:
        self.outcomes.setdefault(proxy.name, []).append(outcome)

    def values(self, proxy: Proxy, key: str) -> list[float]:
        return [
            o.values[key]
            for o in self.outcomes.get(proxy.name, [])
            if o.values is not None and key in o.values
        ]

    def median(self, proxy: Proxy, metric: Metric) -> float | None:
        values = self.values(proxy, metric.key)
        if not values:
            return None
        value = statistics.median(values)
        if metric.minus_direct:
            direct = next((p for p in self.proxies if p.kind == "direct"), None)
            base = self.values(direct, metric.key) if direct else []
            if not base or proxy.kind == "direct":
                return None
            value -= statistics.median(base)
        return value


# ---------------------------------------------------------------------------------------------
# formatting


def fmt(value: float) -> str:
    magnitude = abs(value)
    if value.is_integer():  # counts
        return f"{int(value):,}"
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def _cell(results: ScenarioResults, proxy: Proxy, metric: Metric) -> str:
    runs = results.outcomes.get(proxy.name, [])
    if not runs:
        return "—"
    if all(o.values is None for o in runs):
        return "failed"
    value = results.median(proxy, metric)
    if value is None:
        return "—"
    failed = sum(o.values is None for o in runs)
    return fmt(value) + (f" ({failed}/{len(runs)} failed)" if failed else "")


def _ratio(results: ScenarioResults, subject: Proxy, metric: Metric) -> str:
    reference = next((p for p in results.proxies if p.kind == "haproxy"), None)
    if reference is None:
        return "—"
    a, b = results.median(subject, metric), results.median(reference, metric)
    if a is None or b is None or b <= 0 or a < 0:
        return "—"
    return f"{a / b:.2f}×"


def _spread_row(results: ScenarioResults, columns: int) -> str | None:
    """A row with, per proxy, (max - min) / 2 / median of the table's first (absolute) metric
    over the runs."""
    metric = next(m for m in results.scenario.metrics if not m.minus_direct)
    cells = []
    for proxy in results.proxies:
        values = results.values(proxy, metric.key)
        middle = statistics.median(values) if values else 0
        ok = len(values) >= 2 and middle > 0
        cells.append(f"±{(max(values) - min(values)) / middle / 2:.0%}" if ok else "")
    if not any(cells):
        return None
    name = metric.label.split(" (")[0].rstrip(" ↑↓")
    label = f"_spread of {name} between runs: (max−min)/2/median_"
    return "| " + " | ".join([label, *cells, *[""] * columns]) + " |"


def render_table(results: ScenarioResults, settings: Settings, repeat: int) -> str:
    sc = results.scenario
    subjects = [p for p in results.proxies if p.kind == "midway"]
    has_reference = any(p.kind == "haproxy" for p in results.proxies)
    ratio_columns = subjects if has_reference else []
    header = ["metric", *(f"`{p.name}`" for p in results.proxies)]
    # several midway variants (bulkchain): each ratio column names its variant
    short = len(ratio_columns) == 1
    header += [f"{p.name.split(' ')[0] if short else p.name} ÷ haproxy" for p in ratio_columns]
    lines = [f"## {sc.title}", "", describe(sc, settings), ""]
    if not results.proxies:
        lines += ["_Nothing to run._", ""]
    else:
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" + "---:|" * (len(header) - 1))
        for metric in sc.metrics:
            cells = [metric.label]
            cells += [_cell(results, p, metric) for p in results.proxies]
            cells += [_ratio(results, p, metric) for p in ratio_columns]
            lines.append("| " + " | ".join(cells) + " |")
        spread = _spread_row(results, len(ratio_columns))
        if spread:
            lines.append(spread)
        lines.append("")
        runs = max((len(v) for v in results.outcomes.values()), default=0)
        lines.append(f"Medians of {runs} run(s)." if runs else "No runs.")
    notes = list(results.notes)
    for proxy in results.proxies:
        errors = [o.error for o in results.outcomes.get(proxy.name, []) if o.error]
        if errors:
            notes.append(f"`{proxy.name}` failed {len(errors)}×: {errors[0]}")
    for note in notes:
        lines += ["", "> " + note.replace("\n", "\n> ")]
    lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# machine description


def _first_line(text: str, pattern: str = "") -> str:
    for line in text.splitlines():
        if pattern.lower() in line.lower() and line.strip():
            return line.strip()
    return "not found"


def _git_revision() -> str:
    try:
        done = subprocess.run(
            ["git", "-C", str(REPO), "describe", "--always", "--dirty"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    rev = done.stdout.decode().strip()
    return rev if done.returncode == 0 and rev else "no commit yet"


def machine_info(
    settings: Settings, load_before: tuple[float, float, float]
) -> list[tuple[str, str]]:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.MULTILINE)
    virt = " (virtual machine: hypervisor flag set)" if " hypervisor" in cpuinfo else ""
    meminfo = Path("/proc/meminfo").read_text()
    mem = re.search(r"MemTotal:\s*(\d+)", meminfo)
    uvloop = procs.tool_output([sys.executable, "-c", "import uvloop; print(uvloop.__version__)"])
    return [
        ("CPU", (model.group(1) if model else platform.processor()) + virt),
        (
            "cores",
            f"{os.cpu_count()} online; CPUs {settings.all_cpus} usable by the bench",
        ),
        (
            "load average before the run",
            "{:.2f} {:.2f} {:.2f} (1, 5, 15 min; other work on the machine adds noise)".format(
                *load_before
            ),
        ),
        ("memory", f"{int(mem.group(1)) / 1024 / 1024:.1f} GiB" if mem else "unknown"),
        ("kernel", f"{platform.system()} {platform.release()} {platform.machine()}"),
        ("Python", sys.version.split()[0] + f" ({sys.executable})"),
        (
            "uvloop",
            uvloop.strip().splitlines()[-1] if uvloop.strip() else "not installed",
        ),
        ("midway", f"working tree at {_git_revision()}"),
        ("HAProxy", _first_line(procs.tool_output(["haproxy", "-v"]), "version")),
        ("nginx", _first_line(procs.tool_output(["nginx", "-v"]), "version")),
        ("socat", _first_line(procs.tool_output(["socat", "-V"]), "socat version")),
        ("iperf3", _first_line(procs.tool_output(["iperf3", "-v"]), "iperf")),
        ("wrk", _first_line(procs.tool_output(["wrk", "-v"]), "wrk")),
        (
            "pinning",
            f"proxy on CPU {settings.proxy_cpus}; backends and load generators on CPU "
            f"{settings.load_cpus} (`workers`, `workers-conn`: unpinned, CPUs {settings.all_cpus})",
        ),
    ]


def render(
    *,
    command: str,
    started: str,
    elapsed: float,
    machine: list[tuple[str, str]],
    settings: Settings,
    repeat: int,
    tables: list[ScenarioResults],
    notes: list[str],
) -> str:
    lines = [
        "# midway benchmark results",
        "",
        f"Run {started}, took {elapsed / 60:.1f} min: `{command}`",
        "",
        f"Each figure is the median of {repeat} repetition(s); proxies are interleaved within a "
        "repetition. ↑ higher is better, ↓ lower is better; “÷ haproxy” is midway's figure "
        "divided by HAProxy's. All traffic is over loopback; see bench/README.md for caveats.",
        "",
        "| machine | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in machine),
        "",
    ]
    seen: dict[str, str] = {}
    for table in tables:
        for proxy in table.proxies:
            seen.setdefault(proxy.name, describe_proxy(proxy))
    if seen:
        lines += ["| proxy | configuration |", "|---|---|"]
        lines += [f"| `{name}` | {text} |" for name, text in seen.items()]
        lines.append("")
    for note in notes:
        lines += ["> " + note, ""]
    for table in tables:
        lines.append(render_table(table, settings, repeat))
    return "\n".join(lines)
