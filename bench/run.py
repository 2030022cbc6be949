"""Benchmark midway against direct connections, HAProxy, nginx stream and socat.

    python bench/run.py                    # full run (3 repetitions, about 10 min)
    python bench/run.py --quick            # 1 repetition, shorter tests (about 1.5 min)
    python bench/run.py --scenarios bulk,pingpong --proxies direct,midway,haproxy --repeat 5
    python bench/run.py --out /tmp/results.md

Writes a markdown report (and the raw figures as JSON next to it) and prints the report.
See bench/README.md for what each scenario measures and the caveats.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

# Run as a script: make the `bench` package importable from the repository root, and keep
# bench/ free of __pycache__ directories.
sys.dont_write_bytecode = True
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs, proxies, report  # noqa: E402
from bench.proxies import Proxy  # noqa: E402
from bench.report import Outcome, ScenarioResults  # noqa: E402
from bench.scenarios import BY_NAME, SCENARIOS, Scenario, Settings  # noqa: E402

BENCH = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH / "results" / "latest.md"
DEFAULT_PROXIES = "direct,midway,midway-pure,haproxy,nginx,socat"
APT_PACKAGES = [
    "haproxy",
    "nginx-light",
    "libnginx-mod-stream",
    "socat",
    "iperf3",
    "wrk",
]
TOOLS = ("haproxy", "nginx", "socat", "iperf3", "wrk")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python bench/run.py",
        description=__doc__.split("\n\n")[0],
    )
    names = ",".join(s.name for s in SCENARIOS)
    p.add_argument("--quick", action="store_true", help="1 repetition, 2 s tests, fewer samples")
    p.add_argument(
        "--scenarios", default=names, help=f"comma-separated subset of: {names} (default: all)"
    )
    p.add_argument(
        "--proxies",
        default=DEFAULT_PROXIES,
        help="comma-separated subset of: direct,midway,midway-pure,midway-uvloop,midway-asyncio,"
        "haproxy,nginx,"
        "socat "
        f"(default: {DEFAULT_PROXIES})",
    )
    p.add_argument("--repeat", type=int, help="repetitions (default 3, --quick 1)")
    p.add_argument("--duration", type=int, help="seconds per iperf3/wrk run (default 5, quick 2)")
    p.add_argument("--pingpong-n", type=int, help="round trips (default 20000, quick 5000)")
    p.add_argument("--idle-conns", type=int, help="idle connections (default 5000, quick 1000)")
    p.add_argument(
        "--idle-many",
        type=int,
        help="connections asked of idle50k (default 50000, quick 10000; capped by what fits)",
    )
    p.add_argument("--wrk-connections", type=int, default=50, help="wrk -c (default: 50)")
    p.add_argument("--proxy-cpu", type=int, help="CPU for the proxy (default: first usable)")
    p.add_argument("--load-cpu", type=int, help="CPU for load and backends (default: second)")
    p.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="markdown report (default: bench/results/latest.md; raw JSON beside it)",
    )
    p.add_argument("--no-install", action="store_true", help="never apt-get install tools")
    p.add_argument("--keep-logs", action="store_true", help="keep proxy/backend logs and configs")
    args = p.parse_args(argv)
    quick = args.quick
    args.repeat = args.repeat or (1 if quick else 3)
    args.duration = args.duration or (2 if quick else 5)
    args.pingpong_n = args.pingpong_n or (5000 if quick else 20000)
    args.idle_conns = args.idle_conns or (1000 if quick else 5000)
    args.idle_many = args.idle_many or (10000 if quick else 50000)
    if min(args.repeat, args.duration, args.pingpong_n, args.idle_conns, args.idle_many) < 1:
        p.error(
            "--repeat, --duration, --pingpong-n, --idle-conns and --idle-many must be positive"
        )
    args.scenario_list = _split(args.scenarios, BY_NAME, p)
    try:
        args.proxy_list = [proxies.parse(n) for n in args.proxies.split(",") if n]
    except ValueError as exc:
        p.error(str(exc))
    return args


def _split(value: str, known: dict[str, Scenario], p: argparse.ArgumentParser) -> list[Scenario]:
    chosen = []
    for name in (n.strip() for n in value.split(",") if n.strip()):
        if name not in known:
            p.error(f"unknown scenario {name!r} (choose from {', '.join(known)})")
        chosen.append(known[name])
    return [s for s in SCENARIOS if s in chosen]  # always in the documented order


# ---------------------------------------------------------------------------------------------
# environment


def ensure_tools(allow_install: bool) -> list[str]:
    """Install missing tools with apt-get when running as root; return notes for the report."""

    def missing() -> list[str]:
        gone = [t for t in TOOLS if shutil.which(t) is None]
        if not proxies.NGINX_STREAM_MODULE.exists():
            gone.append("nginx stream module")
        return gone

    absent = missing()
    if not absent:
        return []
    if not allow_install or os.geteuid() != 0 or shutil.which("apt-get") is None:
        why = "--no-install given" if not allow_install else "not root or no apt-get"
        return [f"Missing tools ({why}): {', '.join(absent)}; what needs them shows as failed."]
    print(
        f"installing {' '.join(APT_PACKAGES)} (missing: {', '.join(absent)})",
        file=sys.stderr,
    )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for argv, timeout in (
        (["apt-get", "update"], 600),
        (["apt-get", "install", "-y", *APT_PACKAGES], 1200),
    ):
        try:
            subprocess.run(
                argv,
                env=env,
                timeout=timeout,
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=sys.stderr,
                stderr=sys.stderr,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            return [f"Installing tools failed ({exc}); missing: {', '.join(missing())}."]
    absent = missing()
    return [f"Still missing after apt-get install: {', '.join(absent)}."] if absent else []


def choose_cpus(args: argparse.Namespace) -> tuple[str, str, str, list[str]]:
    """(proxy CPUs, load CPUs, all CPUs) as taskset lists, plus notes; pins this process to
    the load CPU (the ping-pong and idle-connection clients run in it)."""
    usable = sorted(os.sched_getaffinity(0))
    notes = []
    proxy_cpu = args.proxy_cpu if args.proxy_cpu is not None else usable[0]
    load_default = usable[1] if len(usable) > 1 else usable[0]
    load_cpu = args.load_cpu if args.load_cpu is not None else load_default
    if proxy_cpu == load_cpu:
        notes.append(f"Only CPU {proxy_cpu} usable: proxy and load share it.")
    os.sched_setaffinity(0, {load_cpu})
    return str(proxy_cpu), str(load_cpu), procs.cpu_list(usable), notes


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------------------
# running


def proxies_for(sc: Scenario, selected: list[Proxy]) -> tuple[list[Proxy], list[str]]:
    if sc.variants is not None:
        return sc.variants(selected)
    chosen = [p for p in selected if sc.with_direct or p.kind != "direct"]
    notes = []
    needs_direct = any(m.minus_direct for m in sc.metrics)
    if needs_direct and not any(p.kind == "direct" for p in chosen):
        chosen.insert(0, Proxy("direct", "direct"))
        notes.append("`direct` was added: it is the baseline of the added-latency rows.")
    return chosen, notes


def measure_once(sc: Scenario, proxy: Proxy, settings: Settings) -> Outcome:
    s = settings
    if not sc.pinned:
        s = dataclasses.replace(s, proxy_cpus=s.all_cpus, load_cpus=s.all_cpus)
    try:
        with contextlib.ExitStack() as stack:
            try:
                upstream = stack.enter_context(sc.backend(cpus=s.load_cpus, workdir=s.workdir))
            except procs.StartError as exc:
                return Outcome(None, f"backend did not start: {exc}")
            try:
                target = stack.enter_context(
                    proxies.started(proxy, upstream, cpus=s.proxy_cpus, workdir=s.workdir)
                )
            except procs.StartError as exc:
                return Outcome(None, f"did not start: {exc}", start_failed=True)
            values = sc.measure(s, target)
            status = target.exited()
            if status is not None:
                log = target.child.log_excerpt() if target.child else ""
                return Outcome(None, f"exited with status {status} during the run{log}")
            return Outcome(values)
    except (procs.StartError, procs.MeasureError, OSError) as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}")


def _progress(rep: int, repeat: int, sc: Scenario, proxy: Proxy, outcome: Outcome) -> None:
    if outcome.values is None:
        text = "FAILED: " + (outcome.error or "").splitlines()[0]
    else:
        text = "  ".join(f"{k}={report.fmt(v)}" for k, v in outcome.values.items())
    print(
        f"{time.strftime('%H:%M:%S')} [{rep + 1}/{repeat}] {sc.name:<9} {proxy.name:<20} {text}",
        file=sys.stderr,
        flush=True,
    )


def _rotated(items: list[Proxy], k: int) -> list[Proxy]:
    """Each repetition starts with a different proxy, so no proxy always runs first or last."""
    k = k % len(items) if items else 0
    return items[k:] + items[:k]


def run_all(args: argparse.Namespace, settings: Settings) -> tuple[list[ScenarioResults], bool]:
    tables = []
    for sc in args.scenario_list:
        chosen, notes = proxies_for(sc, args.proxy_list)
        missing = [t for t in sc.tools if shutil.which(t) is None]
        if missing:
            notes.append(f"Skipped: {', '.join(missing)} not installed.")
            chosen = []
        tables.append(ScenarioResults(sc, chosen, notes=notes))
    start_failures: dict[str, Outcome] = {}  # a proxy that did not start is not retried
    try:
        for rep in range(args.repeat):
            for table in tables:
                for proxy in _rotated(table.proxies, rep):
                    outcome = start_failures.get(proxy.name) or measure_once(
                        table.scenario, proxy, settings
                    )
                    if outcome.start_failed:
                        start_failures[proxy.name] = outcome
                    table.add(proxy, outcome)
                    _progress(rep, args.repeat, table.scenario, proxy, outcome)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: stopping everything, reporting what was measured",
            file=sys.stderr,
        )
        return tables, True
    finally:
        procs.stop_all()
    return tables, False


def raw_json(tables: list[ScenarioResults], meta: dict[str, object]) -> str:
    data = dict(meta)
    data["scenarios"] = {
        t.scenario.name: {
            name: [o.values if o.values is not None else {"error": o.error} for o in runs]
            for name, runs in t.outcomes.items()
        }
        for t in tables
    }
    return json.dumps(data, indent=1, ensure_ascii=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    command = shlex.join(["python", sys.argv[0], *(sys.argv[1:] if argv is None else argv)])
    notes = ensure_tools(not args.no_install)
    nofile = procs.raise_nofile()
    if nofile < max(args.idle_conns, args.idle_many) * 2 + 100:
        notes.append(f"RLIMIT_NOFILE is only {nofile}: the idle scenario may fall short.")
    proxy_cpus, load_cpus, all_cpus, cpu_notes = choose_cpus(args)
    notes += cpu_notes
    started = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.monotonic()
    load_before = os.getloadavg()
    workdir = Path(tempfile.mkdtemp(prefix="midway-bench-"))
    workdir.chmod(0o755)  # nginx workers run as an unprivileged user and read files here
    settings = Settings(
        duration=args.duration,
        pingpong_n=args.pingpong_n,
        idle_conns=args.idle_conns,
        idle_many=args.idle_many,
        wrk_connections=args.wrk_connections,
        proxy_cpus=proxy_cpus,
        load_cpus=load_cpus,
        all_cpus=all_cpus,
        workdir=workdir,
    )
    try:
        tables, interrupted = run_all(args, settings)
    finally:
        if args.keep_logs:
            print(f"logs and configs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if interrupted:
        notes.insert(0, "**Interrupted**: partial results.")
    text = report.render(
        command=command,
        started=started,
        elapsed=time.monotonic() - t0,
        machine=report.machine_info(settings, load_before),
        settings=settings,
        repeat=args.repeat,
        tables=tables,
        notes=notes,
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plain = {k: str(v) if isinstance(v, Path) else v for k, v in vars(settings).items()}
    meta: dict[str, object] = {"command": command, "started": started, "settings": plain}
    args.out.with_suffix(".json").write_text(raw_json(tables, meta))
    print(
        f"\nwritten: {args.out} (and {args.out.with_suffix('.json').name})",
        file=sys.stderr,
    )
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
