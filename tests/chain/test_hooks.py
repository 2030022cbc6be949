"""Hooks driven directly with bytes: framing, return values, injection both ways,
rejection, failures, and loading errors that name the hook."""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import struct
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from midway.chain import hooks
from midway.chain.base import Attachment
from midway.chain.hooks import HookContext, HookElement, HookError, load_hook
from midway.errors import ConfigError, Rejected

from .harness import FakeOutput, loop_gaps, make_info, run


class Conn:
    """One connection through one hook: both stages started on fake outputs."""

    def __init__(self, element: HookElement, sequence: int = 1) -> None:
        self.info = make_info(sequence)
        attachment = element.attach(self.info)
        assert isinstance(attachment, Attachment)
        self.attachment = attachment
        self.up = FakeOutput(direction="upstream", info=self.info)
        self.down = FakeOutput(direction="downstream", info=self.info)
        for stage, out in ((attachment.upstream, self.up), (attachment.downstream, self.down)):
            if stage is not None:
                stage.start(out)

    async def open(self) -> None:
        if self.attachment.on_open is not None:
            await self.attachment.on_open(self.info)

    async def feed(self, direction: str, *chunks: bytes | None) -> None:
        stage = self.attachment.upstream if direction == "upstream" else self.attachment.downstream
        out = self.up if direction == "upstream" else self.down
        assert stage is not None
        for chunk in chunks:
            if chunk is None:
                await stage.eof(out)
            else:
                await stage.data(chunk, out)
        await settle()

    def close(self, reason: str = "eof") -> None:
        for stage in (self.attachment.upstream, self.attachment.downstream):
            if stage is not None:
                stage.close()
        if self.attachment.on_close is not None:
            self.attachment.on_close(self.info, reason)


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def split_and_coalesce(stream: bytes, seed: int) -> list[bytes]:
    """``stream`` cut at random points: many 1-byte chunks, and chunks holding
    several messages at once."""
    rng = random.Random(seed)
    chunks, i = [], 0
    while i < len(stream):
        n = 1 if rng.random() < 0.5 else rng.randrange(1, 200)
        chunks.append(stream[i:i + n])
        i += n
    return chunks


# --- framing -----------------------------------------------------------------


class Shout:
    """Lines, upper-cased upstream; records every message it sees."""

    framing = "line:\r\n"
    seen: list[tuple[str, bytes]] = []

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        Shout.seen.append((direction, data))
        return data.upper() if direction == "upstream" else None


@pytest.mark.parametrize("seed", range(5))
def test_line_framing_hands_whole_lines_however_the_bytes_arrive(seed: int) -> None:
    lines = [f"set key{i} value-{'x' * (i * 7 % 90)}\r\n".encode() for i in range(60)]
    stream = b"".join(lines)
    Shout.seen = []

    async def main() -> None:
        conn = Conn(HookElement(Shout, "t:Shout"))
        await conn.feed("upstream", *split_and_coalesce(stream, seed))
        assert Shout.seen == [("upstream", line) for line in lines]
        assert conn.up.sent == stream.upper()
        # Each message went on as one send, whatever the TCP chunks were.
        assert [data for _, data in conn.up.sends] == [line.upper() for line in lines]

    run(main())


class Frames:
    framing = "length:2:big"
    max_frame_size = 1000
    seen: list[bytes] = []

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        Frames.seen.append(data)
        body = data[2:][::-1]
        return struct.pack("!H", len(body)) + body


def test_length_prefix_framing_and_rewriting_each_frame() -> None:
    bodies = [bytes(range(n % 256)) * (1 + n // 256) for n in (0, 1, 5, 300, 999 - 2)][:4]
    frames = [struct.pack("!H", len(b)) + b for b in bodies]
    Frames.seen = []

    async def main() -> None:
        conn = Conn(HookElement(Frames, "t:Frames"))
        stream = b"".join(frames)
        await conn.feed("upstream", *[stream[i:i + 1] for i in range(len(stream))])
        assert Frames.seen == frames
        assert conn.up.sent == b"".join(struct.pack("!H", len(b)) + b[::-1] for b in bodies)

    run(main())


def test_a_frame_over_the_limit_resets_after_delivering_the_ones_before() -> None:
    Frames.seen = []

    async def main() -> None:
        conn = Conn(HookElement(Frames, "t:Frames"))
        good = struct.pack("!H", 3) + b"abc"
        await conn.feed("upstream", good + struct.pack("!H", 5000) + b"zzz")
        assert Frames.seen == [good]
        assert conn.up.sent == struct.pack("!H", 3) + b"cba"
        reset = conn.up.first("reset")
        assert reset is not None and "exceeds the limit of 1000 bytes" in reset.reason
        assert "t:Frames" in reset.reason

    run(main())


def test_an_incomplete_last_message_passes_unchanged_at_eof() -> None:
    async def main() -> None:
        Shout.seen = []
        conn = Conn(HookElement(Shout, "t:Shout"))
        await conn.feed("upstream", b"one\r\ntw", b"o", None)
        assert Shout.seen == [("upstream", b"one\r\n")]
        assert conn.up.kinds == ["send", "send", "eof"]
        assert conn.up.sent == b"ONE\r\ntwo"

    run(main())


class PerDirection:
    framing = {"upstream": "fixed:4", "downstream": None}
    seen: list[tuple[str, bytes]] = []

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None:
        PerDirection.seen.append((direction, data))


def test_framing_can_differ_per_direction() -> None:
    PerDirection.seen = []

    async def main() -> None:
        conn = Conn(HookElement(PerDirection, "t:PerDirection"))
        await conn.feed("upstream", b"abcdef", b"gh")
        await conn.feed("downstream", b"xyz")
        assert PerDirection.seen == [("upstream", b"abcd"), ("upstream", b"efgh"),
                                     ("downstream", b"xyz")]
        assert conn.up.sent == b"abcdefgh" and conn.down.sent == b"xyz"

    run(main())


# --- what on_data returns, and injections ------------------------------------------


class Returns:
    """Upstream: ``drop`` drops, ``two`` sends two messages, ``keep`` returns None."""

    framing = "line"

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> Any:
        word = data.strip()
        if word == b"drop":
            return b""
        if word == b"none":
            return []
        if word == b"two":
            return [b"first\n", bytearray(b"second\n")]
        if word == b"mv":
            return memoryview(b"view\n")
        return None


def test_return_values_drop_replace_split_or_keep() -> None:
    async def main() -> None:
        conn = Conn(HookElement(Returns, "t:Returns"))
        await conn.feed("upstream", b"keep\ndrop\ntwo\nnone\nmv\nkeep\n")
        assert conn.up.sent == b"keep\nfirst\nsecond\nview\nkeep\n"

    run(main())


class Gatekeeper:
    """Drops ``secret`` and tells the client; prefixes each command with an
    injected marker towards the server."""

    framing = "line"

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes | None:
        if direction != "upstream":
            return None
        if data.startswith(b"secret"):
            ctx.send_to_client(b"-ERR not allowed\n")
            return b""
        ctx.send_to_server(b">")
        return data


def test_injection_both_ways_goes_through_the_chain_in_order() -> None:
    async def main() -> None:
        conn = Conn(HookElement(Gatekeeper, "t:Gatekeeper"))
        await conn.feed("upstream", b"get a\nsecret x\nget b\n")
        assert conn.up.sent == b">get a\n>get b\n"
        # injected bytes are sent before what the same call returns
        assert [d for _, d in conn.up.sends] == [b">", b"get a\n", b">", b"get b\n"]
        # the reply went into the downstream stage's output (the rest of the chain)
        assert conn.down.sent == b"-ERR not allowed\n"
        assert conn.down.kinds == ["send"]

    run(main())


def test_injection_into_an_ended_direction_is_dropped() -> None:
    async def main() -> None:
        conn = Conn(HookElement(Gatekeeper, "t:Gatekeeper"))
        await conn.feed("downstream", None)
        await conn.feed("upstream", b"secret\n")
        assert conn.down.kinds == ["eof"]
        assert conn.up.sent == b""

    run(main())


class Greeter:
    """Server-speaks-first greeting injected from on_connect."""

    def on_connect(self, ctx: HookContext) -> None:
        ctx.send_to_client(b"hello from midway\n")

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None:
        return None


def test_on_connect_can_send_before_any_data() -> None:
    async def main() -> None:
        element = HookElement(Greeter, "t:Greeter")
        info = make_info()
        attachment = element.attach(info)
        assert attachment.on_open is not None and attachment.downstream is not None
        await attachment.on_open(info)
        down = FakeOutput(direction="downstream", info=info)
        attachment.downstream.start(down)  # as the relay does once on_open passed
        await settle()
        assert down.sent == b"hello from midway\n"

    run(main())


# --- connect, reject, close ----------------------------------------------------


class Gate:
    opened: list[int] = []
    closed: list[tuple[int, str]] = []

    def on_connect(self, ctx: HookContext) -> None:
        if ctx.info.sequence == 2:
            raise Rejected("second connection refused")
        if ctx.info.sequence == 3:
            ctx.close("third connection refused")
        self.id = ctx.id
        Gate.opened.append(ctx.id)

    def on_close(self, ctx: HookContext, reason: str) -> None:
        Gate.closed.append((self.id, reason))


def test_on_connect_rejects_by_raising_or_closing() -> None:
    Gate.opened, Gate.closed = [], []

    async def main() -> None:
        element = HookElement(Gate, "t:Gate")
        first = Conn(element, 1)
        await first.open()
        with pytest.raises(Rejected, match="second connection refused"):
            await Conn(element, 2).open()
        with pytest.raises(Rejected, match="third connection refused"):
            await Conn(element, 3).open()
        first.close("eof")
        assert Gate.opened == [1, 3]
        assert Gate.closed == [(1, "eof")]

    run(main())


def test_a_hook_with_only_on_connect_gets_no_stage() -> None:
    attachment = HookElement(Gate, "t:Gate").attach(make_info())
    assert attachment.upstream is None and attachment.downstream is None
    assert attachment.on_open is not None


class Counter:
    """Per-connection state in ``self``; async callbacks."""

    instances = 0
    closes: list[tuple[int, str]] = []

    def __init__(self) -> None:
        Counter.instances += 1
        self.messages = 0

    async def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None:
        await asyncio.sleep(0)
        self.messages += 1

    async def on_close(self, ctx: HookContext, reason: str) -> None:
        await asyncio.sleep(0)
        Counter.closes.append((self.messages, reason))


def test_a_class_hook_gets_one_object_per_connection() -> None:
    Counter.instances, Counter.closes = 0, []

    async def main() -> None:
        element = HookElement(Counter, "t:Counter")
        a, b = Conn(element, 1), Conn(element, 2)
        await a.feed("upstream", b"x", b"y", b"z")
        await b.feed("downstream", b"q")
        a.close("eof")
        b.close("reset")
        await settle()
        assert Counter.instances == 2
        assert sorted(Counter.closes) == [(1, "reset"), (3, "eof")]

    run(main())


def test_an_object_hook_is_shared_and_keeps_state_in_ctx() -> None:
    hook = SimpleNamespace()

    def on_data(direction: str, data: bytes, ctx: HookContext) -> bytes:
        ctx.state.count = getattr(ctx.state, "count", 0) + 1
        return b"%d:" % ctx.state.count + data

    hook.on_data = on_data

    async def main() -> None:
        element = HookElement(hook, "t:hook")
        a, b = Conn(element, 1), Conn(element, 2)
        await a.feed("upstream", b"x", b"y")
        await b.feed("upstream", b"z")
        assert (a.up.sent, b.up.sent) == (b"1:x2:y", b"1:z")

    run(main())


def test_a_plain_function_is_on_data() -> None:
    def reverse(direction: str, data: bytes, ctx: HookContext) -> bytes:
        return data[::-1]

    async def main() -> None:
        conn = Conn(HookElement(reverse, "t:reverse"))
        await conn.feed("downstream", b"abc")
        assert conn.down.sent == b"cba"

    run(main())


# --- failures ------------------------------------------------------------------


class Broken:
    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        if b"boom" in data:
            raise ValueError("cannot handle boom")
        return data


def test_a_raising_hook_raises_hook_error_naming_it_with_the_cause() -> None:
    async def main() -> None:
        conn = Conn(HookElement(Broken, "pkg.mod:Broken"))
        await conn.feed("upstream", b"fine")
        with pytest.raises(HookError, match=r"hook pkg\.mod:Broken raised in on_data: "
                                            r"ValueError: cannot handle boom") as caught:
            await conn.feed("upstream", b"boom")
        assert isinstance(caught.value.__cause__, ValueError)
        assert conn.up.sent == b"fine"

    run(main())


@pytest.mark.parametrize("bad", ["text", 42, [b"ok", "text"]])
def test_returning_something_other_than_bytes_is_an_error(bad: object) -> None:
    async def main() -> None:
        conn = Conn(HookElement(lambda d, data, ctx: bad, "t:bad"))
        with pytest.raises(HookError, match="t:bad"):
            await conn.feed("upstream", b"x")

    run(main())


def test_a_failing_constructor_is_a_hook_error() -> None:
    class NoInit:
        def __init__(self) -> None:
            raise RuntimeError("no")

        def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None: ...

    async def main() -> None:
        conn = Conn(HookElement(NoInit, "t:NoInit"))
        with pytest.raises(HookError, match="per-connection object failed: RuntimeError: no"):
            await conn.feed("upstream", b"x")

    run(main())


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_on_close_errors_are_logged_not_raised() -> None:
    class BadClose:
        def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None: ...

        def on_close(self, ctx: HookContext, reason: str) -> None:
            raise KeyError("gone")

    async def main() -> None:
        conn = Conn(HookElement(BadClose, "t:BadClose"))
        await conn.feed("upstream", b"x")
        conn.close()

    handler = Records()
    logger = logging.getLogger("midway")
    logger.addHandler(handler)
    try:
        run(main())
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in handler.records] == [
        "conn 1 (test): hook t:BadClose raised in on_close"]
    assert handler.records[0].exc_info is not None


# --- async order ------------------------------------------------------------------


class Slow:
    framing = "line"
    seen: list[bytes] = []

    async def on_data(self, direction: str, data: bytes, ctx: HookContext) -> list[bytes]:
        await asyncio.sleep(random.random() / 1000)
        Slow.seen.append(data)
        ctx.send_to_client(b"ack " + data)
        return [data[:2], data[2:]]


def test_an_async_hook_keeps_order_of_messages_and_of_injections() -> None:
    lines = [b"m%03d\n" % i for i in range(200)]
    Slow.seen = []

    async def main() -> None:
        conn = Conn(HookElement(Slow, "t:Slow"))
        await conn.feed("upstream", *split_and_coalesce(b"".join(lines), 7))
        await settle()
        assert Slow.seen == lines
        assert conn.up.sent == b"".join(lines)
        assert conn.down.sent == b"".join(b"ack " + line for line in lines)

    run(main())


# --- loading ---------------------------------------------------------------------


@pytest.fixture
def module_dir(tmp_path: Path) -> Any:
    sys.path.insert(0, str(tmp_path))
    yield tmp_path
    sys.path.remove(str(tmp_path))
    for name in [n for n in sys.modules if n.startswith("hookmod_")]:
        del sys.modules[name]


def write(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


def test_load_a_class_an_object_and_a_file(module_dir: Path) -> None:
    write(module_dir, "hookmod_ok", """
        class Hook:
            framing = "line"
            def on_data(self, direction, data, ctx):
                return data
        class Box:
            class Inner:
                def on_close(self, ctx, reason): pass
        def on_connect(ctx): pass
    """)
    hook = load_hook("hookmod_ok:Hook")
    assert hook.per_connection and hook.has == {"on_data"} and hook.name == "hook:hookmod_ok:Hook"
    assert load_hook("hookmod_ok:Box.Inner").has == {"on_close"}
    module_hook = load_hook("hookmod_ok:on_connect")
    assert module_hook.function is not None  # a plain function is on_data
    from_file = load_hook(f"{module_dir / 'hookmod_ok.py'}:Hook")
    assert from_file.framing == {"upstream": "line", "downstream": "line"}


@pytest.mark.parametrize(("spec", "source", "message"), [
    ("nocolon", "", "expected MODULE:ATTR"),
    ("hookmod_missing:Hook", None, "no module named 'hookmod_missing'"),
    ("hookmod_a:Nope", "X = 1", "'hookmod_a' has no attribute 'Nope'"),
    ("hookmod_b:Hook", "import hookmod_not_there", "importing 'hookmod_b' failed: "
                                                  "ModuleNotFoundError"),
    ("hookmod_c:Hook", "def broken(:\n  pass", "importing 'hookmod_c' failed: SyntaxError"),
    ("hookmod_d:Hook", "raise RuntimeError('at import')",
     "importing 'hookmod_d' failed: RuntimeError: at import"),
    ("hookmod_e:X", "X = 42", "defines none of on_connect, on_data, on_close"),
    ("hookmod_f:Hook", "class Hook:\n  framing = 'lines'\n  def on_data(s, d, b, c): pass",
     "bad framing spec 'lines'"),
    ("hookmod_g:Hook", "class Hook:\n  max_frame_size = 0\n  def on_data(s, d, b, c): pass",
     "max_frame_size must be a positive number"),
    ("hookmod_h:Hook", "class Hook:\n  framing = {'up': 'line'}\n  def on_data(s, d, b, c): pass",
     "framing keys are 'upstream' and 'downstream'"),
    ("/no/such/file.py:Hook", None, "no file '/no/such/file.py'"),
])
def test_load_errors_are_config_errors_naming_the_hook(
        module_dir: Path, spec: str, source: str | None, message: str) -> None:
    if source is not None and ":" in spec:
        write(module_dir, spec.split(":")[0], source)
    with pytest.raises(ConfigError) as caught:
        load_hook(spec, "proxy.p.hooks[2]")
    assert caught.value.path == "proxy.p.hooks[2]"
    assert f"hook {spec!r}" in caught.value.message
    assert message in caught.value.message


# --- what a hook may cost: base exceptions, blocking hooks, bounds, yields --------


class Raiser:
    raising: BaseException = SystemExit(1)

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        raise Raiser.raising


@pytest.mark.parametrize("raised", [SystemExit(1), KeyboardInterrupt(), asyncio.CancelledError()])
def test_base_exceptions_from_a_hook_are_hook_errors(raised: BaseException) -> None:
    Raiser.raising = raised

    async def main() -> None:
        conn = Conn(HookElement(Raiser, "t:Raiser"))
        with pytest.raises(HookError, match=f"t:Raiser raised in on_data: "
                                            f"{type(raised).__name__}") as caught:
            await conn.feed("upstream", b"x")
        assert caught.value.__cause__ is raised

    run(main())


def test_cancelling_a_hook_call_is_a_cancellation_not_a_hook_error() -> None:
    class Waits:
        async def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None:
            await asyncio.Event().wait()

    async def main() -> None:
        conn = Conn(HookElement(Waits, "t:Waits"))
        task = asyncio.ensure_future(conn.feed("upstream", b"x"))
        await settle()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(main())


def test_on_connect_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hooks, "HOOK_CALLBACK_TIMEOUT_S", 0.05)

    class Forever:
        async def on_connect(self, ctx: HookContext) -> None:
            await asyncio.Event().wait()

    async def main() -> None:
        conn = Conn(HookElement(Forever, "t:Forever"))
        with pytest.raises(HookError, match="t:Forever: on_connect still running after 0.05 s"):
            await conn.open()

    run(main())


class InThread:
    blocking = True
    threads: list[int] = []
    running = 0
    overlapped = False

    def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
        InThread.running += 1
        InThread.overlapped |= InThread.running > 1
        InThread.threads.append(threading.get_ident())
        time.sleep(0.02)
        ctx.send(direction, b"<")  # from the pool thread
        InThread.running -= 1
        return data.upper()


def test_a_blocking_hook_runs_in_the_pool_in_order_one_call_at_a_time() -> None:
    InThread.threads, InThread.running, InThread.overlapped = [], 0, False

    async def main() -> None:
        conn = Conn(HookElement(InThread, "t:InThread"))
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.001)

        ticker = asyncio.ensure_future(tick())
        await asyncio.gather(conn.feed("upstream", b"a", b"b"), conn.feed("downstream", b"c"))
        ticker.cancel()
        assert conn.up.sent == b"<A<B" and conn.down.sent == b"<C"
        assert ticks > 10  # the loop ran while the hook slept (60 ms)
        assert threading.get_ident() not in InThread.threads
        assert not InThread.overlapped  # the two directions took turns

    run(main())


def test_blocking_must_be_true_or_false() -> None:
    class Odd:
        blocking = "yes"

        def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None: ...

    with pytest.raises(ConfigError, match="blocking must be True or False, not 'yes'"):
        HookElement(Odd, "t:Odd")


def test_a_slow_sync_hook_gets_one_warning_naming_it() -> None:
    class Slow:
        def on_data(self, direction: str, data: bytes, ctx: HookContext) -> None:
            time.sleep(hooks.HOOK_SLOW_CALL_S + 0.01)

    async def main() -> None:
        conn = Conn(HookElement(Slow, "t:Slow"))
        await conn.feed("upstream", b"x", b"y")

    handler = Records()
    logger = logging.getLogger("midway")
    logger.addHandler(handler)
    try:
        run(main())
    finally:
        logger.removeHandler(handler)
    warnings = [r.getMessage() for r in handler.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("hook t:Slow: a call to on_data held the event loop for 0.1")
    assert "blocking = True" in warnings[0]


def test_a_framed_hook_lets_the_loop_run_between_messages(real_slices: float) -> None:
    class DropAll:
        framing = "fixed:16"

        def on_data(self, direction: str, data: bytes, ctx: HookContext) -> bytes:
            time.sleep(0.0001)  # 4096 messages of ≥ 0.1 ms: ≥ 0.4 s in one chunk
            return b""

    async def main() -> None:
        conn = Conn(HookElement(DropAll, "t:DropAll"))
        async with loop_gaps() as gaps:
            await conn.feed("upstream", bytes(1 << 16))
        assert len(gaps) > 50
        # The median, not the maximum: a loaded machine may preempt the whole
        # process now and then, which no yielding can prevent.
        assert statistics.median(gaps) < 0.02, gaps

    run(main())
