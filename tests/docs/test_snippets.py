"""What a user copies from the docs works as written: every TOML block passes
``midway --config FILE --check``, every ``midway LISTEN UPSTREAM ...`` command
line passes ``--check``, every Python block compiles, every JSON block parses,
every ``--flag`` named is one midway (or the tool it belongs to) takes, every
relative link and ``#anchor`` resolves, every repository path, metric and
``pip install`` extra named exists, and what the docs list by hand (tables of
keys and defaults, the access log's fields and reasons, a reload's log line)
is what the code has.

A block's placeholders are filled in as a user would: files under
/etc/midway, /var/log/midway and /run are made in a temporary directory
(certificates by openssl), a listening port below 1024 is moved above it, and a
fragment (keys shown without their table, or a proxy without ``listen`` and
``upstreams``) is completed with what it leaves out.  Everything runs in
process: no socket is bound."""

from __future__ import annotations

import ast
import builtins
import functools
import json
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import MISSING, fields
from pathlib import Path

import pytest

from midway import cli
from midway.config import schema
from midway.config.load import config_from_dict
from midway.control.plane import reload_summary
from midway.core.observer import CloseReason, CloseRecord
from midway.metrics.table import BY_NAME
from midway.upstream.dial import DialFailure

from ..helpers import ROOT
from ..tlspki import Pki, make_pki

DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```", re.M | re.S)
PYCF_ALLOW_TOP_LEVEL_AWAIT = 0x2000  # ast.PyCF_ALLOW_TOP_LEVEL_AWAIT: the faults.md Python block
# Flags of other tools that the docs' command lines use (curl, redis-cli, npm, wrk),
# and `--health-KEY`, the pattern docs/configuration.md names.
OTHER_FLAGS = {"--cacert", "--resolve", "--pipe", "--prefix", "--latency", "--health-",
               "--native"}  # py-spy's (docs/benchmarks.md)
SUBCOMMANDS = ("replay", "connections", "top")


def fenced(lang: str) -> Iterator[tuple[str, str]]:
    """(``file:line``, body) of every block fenced as ``lang``."""
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for match in FENCE.finditer(text):
            if match.group(1) == lang:
                where = f"{doc.relative_to(ROOT)}:{text.count(chr(10), 0, match.start()) + 1}"
                yield where, match.group(2)


def blocks(lang: str) -> list[object]:
    return [pytest.param(body, id=where) for where, body in fenced(lang)]


def command_lines() -> list[object]:
    """Every ``midway LISTEN UPSTREAM ...`` (or ``python -m midway ...``) line
    of the docs' shell blocks (backslash continuations joined, comments cut): the subcommands and the
    usage synopsis (LISTEN, FILE) are not runnable as they stand."""
    found = []
    for where, body in fenced("sh"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.removeprefix("python -m ")  # the README's first command
            words = shlex.split(line, comments=True) if line.startswith("midway ") else []
            if (words and words[1:2] and words[1] not in SUBCOMMANDS
                    and "LISTEN" not in words and "FILE" not in words):
                found.append(pytest.param(words[1:], id=f"{where}: {shlex.join(words)}"))
    return found


# -- placeholders ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Callable[[], Pki]:
    """The certificates, made (or the test skipped) only for a block that names one."""
    return functools.cache(lambda: make_pki(tmp_path_factory.mktemp("pki")))


def placeholder(path: str, tmp: Path, pki: Callable[[], Pki]) -> str:
    """Where ``path`` of the doc is here, with what it names in it."""
    name = Path(path).name
    local = tmp / name
    if name.endswith((".pem", ".key", ".crt")):
        source = (pki().server_key if name.endswith(".key") else
                  pki().ca if "ca" in name.split(".")[0].split("-") else pki().server_chain)
        local.write_bytes(source.read_bytes())
    elif name == "token":
        local.write_text("secret\n")
    return str(local)


def filled(text: str, tmp: Path, pki: Callable[[], Pki]) -> str:
    text = re.sub(r"(?<![\w.])/(?:etc/midway|var/log/midway|run(?:/midway)?)/[\w.-]+",
                  lambda m: placeholder(m.group(0), tmp, pki), text)
    text = re.sub(r"unix:/run/[\w.-]+", lambda m: f"unix:{tmp / Path(m.group(0)).name}", text)
    # Listening below 1024 needs root, which --check knows: move such a port up.
    return re.sub(r"(?<=:)([1-9]\d{0,2})(?=[\"\s,]|$)", lambda m: str(int(m.group(1)) + 10000), text)


def completed(body: str) -> str:
    """A fragment made a whole file: bare keys go into a proxy's table, and a
    proxy without ``listen`` or ``upstreams`` gets them."""
    data = tomllib.loads(body)
    if set(data) - {"server", "defaults", "proxy"}:
        body, data = "[proxy.fragment]\n" + body, tomllib.loads("[proxy.fragment]\n" + body)
    for name, table in data.get("proxy", {}).items():
        missing = "".join(line for key, line in (("listen", 'listen = "127.0.0.1:0"\n'),
                                                 ("upstreams", 'upstreams = "127.0.0.1:9"\n'))
                          if key not in table and not (key == "upstreams" and "routes" in table))
        header = f"[proxy.{name}]"
        at = re.search(rf"^{re.escape(header)}[^\n]*\n", body, re.M)
        body = (body[:at.end()] + missing + body[at.end():] if at
                else f"{header}\n{missing}" + body) if missing else body
    return body


def check(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main([*args, "--check"])
    out, err = capsys.readouterr()
    assert code == 0 and "configuration OK" in out, err


# -- the tests -------------------------------------------------------------------------

@pytest.mark.parametrize("body", blocks("toml"))
def test_toml_block_passes_check(body: str, tmp_path: Path, pki: Callable[[], Pki],
                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "midway.toml"
    config.write_text(completed(filled(body, tmp_path, pki)))
    check(["--config", str(config)], capsys)


@pytest.mark.parametrize("args", command_lines())
def test_command_line_passes_check(args: list[str], tmp_path: Path, pki: Callable[[], Pki],
                                   capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for word in args:  # the files the command names, made as a user has them
        if word.endswith((".pem", ".key")):
            placeholder(word, tmp_path, pki)
        elif word.endswith(".toml"):
            (tmp_path / word).write_text('[proxy.a]\nlisten = "127.0.0.1:0"\nupstreams = "127.0.0.1:9"\n')
        elif word.startswith("./") and ".py:" in word:
            module, _, attr = word.partition(":")
            (tmp_path / module).write_text(f"class {attr}:\n    def on_data(self, direction, data, ctx):\n"
                                         "        return data\n")
    check([filled(word, tmp_path, pki) for word in args], capsys)


@pytest.mark.parametrize("body", blocks("python"))
def test_python_block_compiles(body: str) -> None:
    compile(body, "<doc>", "exec", flags=PYCF_ALLOW_TOP_LEVEL_AWAIT)


def unbound_modules(body: str) -> set[str]:
    """Names a block uses as ``NAME.attribute`` (a module: ``pytest.raises``,
    ``midway.Proxy``) that it neither imports nor binds.  A user who copies the
    block gets a ``NameError`` there; placeholders (``UPSTREAM``, ``MyHook``,
    ``fetch_status``) are plain names, not attribute bases, and pass."""
    tree = ast.parse(body)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            bound.add(node.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
    return {node.value.id for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
            and node.value.id not in bound}


@pytest.mark.parametrize("body", blocks("python"))
def test_python_block_imports_what_it_uses(body: str) -> None:
    """faults.md's per-connection pytest example called ``pytest.raises`` with no
    ``import pytest``: copied into a test file it failed with a NameError."""
    assert unbound_modules(body) == set()


def test_unbound_modules_sees_a_missing_import() -> None:
    assert unbound_modules("def test(x):\n    with pytest.raises(E):\n        x.y()\n") == {"pytest"}
    assert unbound_modules("import pytest\nwith pytest.raises(E) as e:\n    e.value\n") == set()


@pytest.mark.parametrize("body", blocks("json"))
def test_json_block_parses(body: str) -> None:
    json.loads(body)


def midway_flags(capsys: pytest.CaptureFixture[str]) -> set[str]:
    """Every flag of ``midway --help`` and its subcommands' ``--help``."""
    flags = set()
    for argv in (["--help"], *([name, "--help"] for name in SUBCOMMANDS)):
        with pytest.raises(SystemExit):
            cli.main(argv)
        flags |= set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    return flags


def test_every_flag_named_exists(capsys: pytest.CaptureFixture[str]) -> None:
    import bench.run
    from midway.layers import fuzz
    known = midway_flags(capsys) | OTHER_FLAGS
    for module in (bench.run, fuzz):
        with pytest.raises(SystemExit):
            module.main(["--help"])
        known |= set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    named = {(doc.relative_to(ROOT).as_posix(), flag) for doc in DOCS
             for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", doc.read_text(encoding="utf-8"))}
    assert sorted((doc, flag) for doc, flag in named if flag not in known) == []


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(doc: Path) -> set[str]:
    """A repeated heading's anchor gets ``-1``, ``-2``, ... as on GitHub."""
    found, seen = set(), dict[str, int]()
    for heading in re.findall(r"^#+ (.*)$", FENCE.sub("", doc.read_text(encoding="utf-8")), re.M):
        count = seen[slug(heading)] = seen.get(slug(heading), -1) + 1
        found.add(f"{slug(heading)}-{count}" if count else slug(heading))
    return found


def test_links_and_anchors_resolve() -> None:
    broken = []
    for doc in DOCS:
        for link in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", doc.read_text(encoding="utf-8"))):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            if not target.exists() or (anchor and target.suffix == ".md"
                                       and anchor not in anchors(target)):
                broken.append(f"{doc.relative_to(ROOT)}: {link}")
    assert broken == []


def test_readme_access_log_names_every_field_reason_and_failure() -> None:
    """The README's "Logs" section: its example line has the access log's keys,
    in order, and its lists of ``reason`` and ``failures`` values are the enums'."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    logs = text[text.index("## Logs"):text.index("## Running it as a service")]
    block = FENCE.search(logs)
    assert block and block.group(1) == "json"
    assert list(json.loads(block.group(2))) == [f.name for f in fields(CloseRecord)]
    reasons = logs[logs.index("`reason` is one of"):logs.index("`first_close` is")]
    assert set(re.findall(r"`([a-z_]+)`", reasons)) - {"reason", "route", "sni", "upstream_addr", "null"} == set(CloseReason)
    failures = logs[logs.index("with a reason:"):logs.index("A failing upstream")]
    assert set(re.findall(r"`([a-z_]+)`", failures)) - {"upstream_tls"} == set(DialFailure)


def table_defaults(doc: str, heading: str) -> dict[str, str]:
    """``{key: default cell}`` of the first table after ``heading`` in ``doc``
    that has a Default column; a ``--flag`` key is named as its option."""
    text = (ROOT / doc).read_text(encoding="utf-8")
    lines = text[text.index(heading):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.lower().startswith("| key")
                 or line.startswith("| flag"))
    column = [c.strip().lower() for c in lines[start].strip("|").split("|")].index("default")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        key = re.match(r"`(?:--)?([\w-]+)", cells[0])
        assert key, line
        rows[key.group(1).replace("-", "_")] = cells[column]
    return rows


def schema_default(cls: type, key: str) -> object:
    field = next((f for f, _ in schema.options_of(cls) if f.name == key), None)
    assert field is not None, f"{key}: not an option of {cls.__name__}"
    return field.default if field.default is not MISSING else field.default_factory()  # type: ignore[misc]


@pytest.mark.parametrize(("doc", "heading", "classes"), [
    ("README.md", "## Command line", ("ProxyConfig", "ServerConfig")),
    ("docs/balancing.md", "## Health checks", ("HealthConfig",)),
    ("docs/proxy-protocol.md", "## Configuration", ("ProxyConfig",)),
])
def test_hand_written_tables_of_keys_match_the_schema(doc: str, heading: str,
                                                      classes: tuple[str, ...]) -> None:
    """A table of keys written by hand (configuration.md is generated) names
    options that exist, with the schema's defaults: a number the table gives
    is the default, and so is a literal in backticks."""
    checked = 0
    for key, cell in table_defaults(doc, heading).items():
        number = re.match(r"`?(\d[\d.]*)`?(?!\S)", cell)
        literal = re.fullmatch(r"`(.*)`", cell)
        if not (number or literal):  # words: "off", "none", "splice on"
            continue
        owner = next((getattr(schema, c) for c in classes
                      if any(f.name == key for f, _ in schema.options_of(getattr(schema, c)))),
                     getattr(schema, classes[0]))
        default = schema_default(owner, key)
        if number:
            assert float(number.group(1)) == default, (doc, key, cell, default)
        else:
            value = list(default) if isinstance(default, tuple) else default
            assert literal and literal.group(1) in (str(value), json.dumps(value)), (
                doc, key, cell, default)
        checked += 1
    assert checked >= 4


def test_readme_reload_line_is_what_that_reload_logs() -> None:
    """The README's example reload line (cache removed, db added, web's
    upstreams and idle timeout changed) is what :func:`reload_summary` writes
    for that reload, keys in its order."""
    def proxies(**tables: dict[str, object]) -> list[schema.ProxyConfig]:
        return list(config_from_dict({"proxy": {
            name: {"listen": f"127.0.0.1:{8000 + i}", "upstreams": "127.0.0.1:9", **table}
            for i, (name, table) in enumerate(tables.items())}}).proxies)
    logged = reload_summary(proxies(cache={}, web={}),
                            proxies(db={}, web={"upstreams": "127.0.0.1:10", "idle_timeout_s": 5}))
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    assert f"`reload: done ({logged})`" in readme


def test_every_metric_named_exists() -> None:
    """A ``midway_...`` name in the docs (a query, a prose mention) is a metric
    /metrics serves, or one of its histogram series, or a pytest fixture."""
    fixtures = {"midway_proxy", "midway_replay"}
    series = {name + suffix for name in BY_NAME for suffix in ("", "_bucket", "_sum", "_count")}
    named = {(doc.relative_to(ROOT).as_posix(), name) for doc in DOCS
             for name in re.findall(r"\bmidway_[a-z_]+", doc.read_text(encoding="utf-8"))}
    assert sorted((doc, name) for doc, name in named if name not in series | fixtures) == []


def test_every_repository_path_named_exists() -> None:
    """A path into the repository in the docs' text (``midway/replay.py``,
    ``tests/e2e/test_peers_proxyproto.py``) names a file or directory there;
    files that a run writes or that a user's own test has are the exceptions."""
    outputs = {"bench/results/latest.md", "tests/data/session.pcap", ".ci/node"}
    named = {(doc.relative_to(ROOT).as_posix(), path) for doc in DOCS
             for path in re.findall(r"(?<![\w/.-])(?:midway|tests|bench|examples|docs|\.ci)/"
                                    r"[\w./-]*\w", doc.read_text(encoding="utf-8"))}
    assert sorted((doc, path) for doc, path in named
                  if path not in outputs and not (ROOT / path).exists()) == []


def test_architecture_module_table_names_existing_modules() -> None:
    """docs/architecture.md's table of modules: each row's first cell names
    files beside the first one (``midway/upstream/balancers/``, ``health.py``)."""
    missing = []
    for line in (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").splitlines():
        if line.startswith("| `midway"):
            first, *others = re.findall(r"`([^`]+)`", line.split(" | ")[0])
            folder = Path(first.rstrip("/")).parent
            missing += [name for name in [first, *(n if n.startswith("midway/") else
                                                   str(folder / n) for n in others)]
                        if not (ROOT / name).exists()]
    assert missing == []


def test_readme_names_the_keys_that_have_no_flag() -> None:
    """"Every option of the configuration file is also a flag, except four":
    the four are the schema's options without a flag and the table keys
    without one (configuration.md's ``—``)."""
    without = {f.name for cls in (schema.ServerConfig, schema.ProxyConfig)
               for f, info in schema.options_of(cls) if not info.cli}
    without |= {"routes"}  # `[[proxy.NAME.routes]]`: a table, no flag (reference.py)
    reference = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert {key for key, flag in re.findall(r"^\| `(\w+)` \| (\S+) \|", reference, re.M)
            if flag == "—"} <= without
    readme = " ".join((ROOT / "README.md").read_text(encoding="utf-8").split())
    sentence = readme[readme.index("is also a flag, except four:"):]
    sentence = sentence[:sentence.index("`midway --help` lists them")]
    assert without <= set(re.findall(r"`(\w+)`", sentence)) and len(without) == 4, sentence


def test_every_extra_installed_exists() -> None:
    """``pip install '.[test]'``, ``'.[fast]'``: extras the package declares."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "optional-dependencies"]
    named = {extra for doc in DOCS
             for extra in re.findall(r"pip install (?:-e )?'\.\[(\w+)\]'", doc.read_text(encoding="utf-8"))}
    assert named and named <= set(declared)
