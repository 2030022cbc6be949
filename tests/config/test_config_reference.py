"""docs/configuration.md is generated from the schema: it must be up to date, cover
every option, and agree with ``midway --help`` and the loader."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import typing
from dataclasses import Field
from pathlib import Path
from typing import Any

import pytest

from midway.config.load import config_from_dict
from midway.config.reference import EXAMPLE_TOML, REGENERATE, render_reference
from midway.config.schema import OptionInfo, ProxyConfig, ServerConfig, options_of

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "configuration.md"
SERVER_HEADING = "## `[server]`"
PROXY_HEADING = "## `[defaults]` and `[proxy.NAME]`"

ALL_OPTIONS = [
    pytest.param(cls, f, info, id=f"{cls.__name__}.{f.name}")
    for cls in (ServerConfig, ProxyConfig)
    for f, info in options_of(cls)
]
CLI_OPTIONS = [
    pytest.param(cls, f, info, id=f"{cls.__name__}.{f.name}")
    for cls in (ServerConfig, ProxyConfig)
    for f, info in options_of(cls)
    if info.cli
]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def section(text: str, cls: type) -> str:
    """The part of the reference that documents ``cls``'s table."""
    server_at, proxy_at = text.index(SERVER_HEADING), text.index(PROXY_HEADING)
    end = text.index("\n## ", proxy_at + 1)
    return text[server_at:proxy_at] if cls is ServerConfig else text[proxy_at:end]


def row(text: str, cls: type, key: str) -> list[str]:
    """The cells of the table row for ``key`` in ``cls``'s section."""
    rows = [line for line in section(text, cls).splitlines()
            if line.startswith(f"| `{key}` |")]
    assert len(rows) == 1, f"{cls.__name__}.{key}: expected one row, found {len(rows)}"
    return [cell.strip() for cell in rows[0].strip("|").split(" | ")]


@pytest.fixture(scope="module")
def reference() -> str:
    return render_reference()


@pytest.fixture(scope="module")
def help_text() -> str:
    result = subprocess.run(
        [sys.executable, "-m", "midway", "--help"], cwd=REPO, capture_output=True, text=True,
        timeout=20, env={**os.environ, "COLUMNS": "100"},
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_docs_file_is_up_to_date(reference: str) -> None:
    assert DOC.read_text(encoding="utf-8") == reference, (
        f"docs/configuration.md is out of date with the schema; regenerate it: {REGENERATE}"
    )


def test_header_says_generated_and_how_to_regenerate(reference: str) -> None:
    head = reference.split("-->", 1)[0]
    assert head.startswith("<!--")
    assert "Generated" in head and "do not" in head
    assert REGENERATE in " ".join(head.split())


def test_module_prints_exactly_the_reference(reference: str) -> None:
    # The regenerate command in the header must produce the file byte for byte.
    result = subprocess.run([sys.executable, "-m", "midway.config.reference"], cwd=REPO,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr
    assert result.stdout == reference


@pytest.mark.parametrize(("cls", "f", "info"), ALL_OPTIONS)
def test_every_option_is_documented(
    reference: str, cls: type, f: Field[Any], info: OptionInfo
) -> None:
    key, cli_flag, kind, default, meaning = row(reference, cls, f.name)
    assert info.doc.strip() in meaning
    for fact in (info.zero.removeprefix("(empty) "), info.provenance):
        assert fact in meaning
    if info.unit:
        assert default.endswith(info.unit)
    if typing.get_type_hints(cls)[f.name] is bool:
        assert default == ("`true`" if f.default else "`false`")
    elif isinstance(f.default, tuple):
        assert default == "`[" + ", ".join(f'"{v}"' for v in f.default) + "]`"
    else:
        assert repr(f.default).strip("'").removesuffix(".0") in default
    for choice in info.choices:
        assert f"`{choice}`" in kind
    if info.cli:
        assert cli_flag.startswith(f"`{flag(info.flag or f.name)}`")
    else:
        assert cli_flag == "—"


def help_flags(help_text: str) -> set[str]:
    """The flags ``--help`` documents (each option line starts with them)."""
    found: set[str] = set()
    for line in help_text.splitlines():
        match = re.match(r"\s+(-\w, )?(--[\w-]+)(, (--[\w-]+))?", line)
        if match:
            found.update(g for g in (match.group(2), match.group(4)) if g)
    return found


@pytest.mark.parametrize(("cls", "f", "info"), CLI_OPTIONS)
def test_every_flag_in_the_reference_is_in_help(
    reference: str, help_text: str, cls: type, f: Field[Any], info: OptionInfo
) -> None:
    documented = row(reference, cls, f.name)[1]
    for cli_flag in documented.split(", "):
        assert cli_flag.strip("`") in help_flags(help_text)


def test_every_help_flag_is_in_the_reference(reference: str, help_text: str) -> None:
    # The reverse direction: nothing the command line offers is missing from the docs.
    schema_flags = help_flags(help_text) - {"--help", "--config", "--check", "--version"}
    assert len(schema_flags) >= len(CLI_OPTIONS), help_text
    for schema_flag in schema_flags:
        assert f"`{schema_flag}`" in reference


def test_flags_of_the_same_name_are_not_mixed_up(reference: str) -> None:
    # server.max_connections has no flag; --max-connections is the per-proxy one.
    assert row(reference, ServerConfig, "max_connections")[1] == "—"
    assert row(reference, ProxyConfig, "max_connections")[1] == "`--max-connections`"


@pytest.mark.parametrize("key", ["listen", "upstreams"])
def test_required_proxy_keys_are_documented(reference: str, key: str) -> None:
    cells = row(reference, ProxyConfig, key)
    assert cells[3] == "required"
    assert "`unix:/path`" in cells[4]


def test_the_example_is_a_valid_configuration(reference: str) -> None:
    assert f"```toml\n{EXAMPLE_TOML}```" in reference
    config = config_from_dict(tomllib.loads(EXAMPLE_TOML))
    redis, web = config.proxies
    assert config.server.drain_timeout_s == 10
    # [defaults] is inherited, and a proxy's own value wins.
    assert (redis.connect_timeout_s, redis.idle_timeout_s) == (3, 600)
    assert (web.connect_timeout_s, web.idle_timeout_s) == (3, 0)
    assert len(redis.upstreams) == 3 and len(web.listen) == 2
    assert [(u.weight, u.backup) for u in redis.upstreams] == [(1, False), (3, False), (1, True)]
    assert redis.health.send == "PING\r\n" and redis.balance == "least_connections"


def test_markdown_tables_are_well_formed(reference: str) -> None:
    # Every row has the header's five cells (a stray "|" in a doc string would add one).
    for line in reference.splitlines():
        if line.startswith("| "):
            cells = line.replace("\\|", "").strip("|").split("|")
            assert len(cells) == 5, line
