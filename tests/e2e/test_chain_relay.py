"""The relay with chain elements: live attach/detach keeps every byte in order,
failing elements close one connection only, ``on_open`` can reject."""

from __future__ import annotations

import asyncio
import os
import random

import midway
from midway.chain.base import Attachment, ConnectionInfo, Element, Output, Stage
from midway.errors import Rejected

from ..helpers import read_exactly, read_to_eof, run, send_blob, serve, sha256, sha256_to_eof


class Jumble(Stage):
    """Re-chunks data randomly and sleeps a little between pieces; holds a tail
    back between calls so that ``flush`` has something to deliver."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.held = b""

    async def data(self, data: bytes, out: Output) -> None:
        data = self.held + data
        keep = self.rng.randrange(0, min(len(data), 100) + 1)
        data, self.held = data[:len(data) - keep], data[len(data) - keep:]
        while data:
            n = self.rng.randrange(1, 40000)
            await out.send(data[:n])
            data = data[n:]
            if self.rng.random() < 0.05:
                await out.sleep(0.001)

    async def eof(self, out: Output) -> None:
        await out.send(self.held)
        self.held = b""
        await out.send_eof()

    async def flush(self, out: Output) -> None:
        await out.send(self.held)
        self.held = b""


class JumbleElement(Element):
    def __init__(self, seed: int) -> None:
        self.name = f"jumble{seed}"
        self.rng = random.Random(seed)
        self.attached = 0

    def attach(self, info: ConnectionInfo) -> Attachment:
        self.attached += 1
        return Attachment(upstream=Jumble(self.rng), downstream=Jumble(self.rng))


def test_elements_added_and_removed_mid_transfer_lose_nothing() -> None:
    size = 48 * 1024 * 1024
    blob = os.urandom(1 << 20) * (size >> 20)

    async def main() -> None:
        async with serve() as port, midway.Proxy("127.0.0.1:0", f"127.0.0.1:{port}") as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)

            async def toggle() -> None:
                elements = [JumbleElement(seed) for seed in range(3)]
                for round_ in range(12):
                    await asyncio.sleep(0.03)
                    element = elements[round_ % 3]
                    if element in proxy.service.elements:
                        proxy.remove_element(element)
                    else:
                        proxy.add_element(element)
                for element in list(proxy.service.elements):
                    proxy.remove_element(element)
                assert sum(e.attached for e in elements) > 0

            sender = asyncio.create_task(send_blob(writer, blob, piece=256 * 1024))
            toggler = asyncio.create_task(toggle())
            digest, total = await sha256_to_eof(reader)
            await sender
            await toggler
            assert total == size
            assert digest == sha256(blob)
            writer.close()

    run(main(), timeout=120)


class Upper(Stage):
    async def data(self, data: bytes, out: Output) -> None:
        await out.send(data.upper())


class Exploding(Stage):
    async def data(self, data: bytes, out: Output) -> None:
        if b"boom" in data:
            raise RuntimeError("user hook failed")
        await out.send(data)


class SimpleElement(Element):
    def __init__(self, name: str, make_up=None, make_down=None, on_open=None) -> None:  # type: ignore[no-untyped-def]
        self.name = name
        self.make_up, self.make_down, self.on_open = make_up, make_down, on_open

    def attach(self, info: ConnectionInfo) -> Attachment:
        return Attachment(
            upstream=self.make_up() if self.make_up else None,
            downstream=self.make_down() if self.make_down else None,
            on_open=self.on_open,
        )


def test_stage_changes_data_in_one_direction_only() -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}",
                elements=[SimpleElement("upper", make_up=Upper)]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"hello")
            assert await read_exactly(reader, 5) == b"HELLO"
            writer.close()

    run(main())


def test_failing_stage_closes_only_its_connection() -> None:
    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}",
                elements=[SimpleElement("explode", make_up=Exploding)]) as proxy:
            r1, w1 = await asyncio.open_connection(*proxy.address)
            r2, w2 = await asyncio.open_connection(*proxy.address)
            w1.write(b"boom")
            try:
                assert await read_to_eof(r1, timeout=2) == b""
            except ConnectionResetError:
                pass  # reset is the expected way to end it
            w2.write(b"fine")
            assert await read_exactly(r2, 4) == b"fine"
            r3, w3 = await asyncio.open_connection(*proxy.address)
            w3.write(b"new")
            assert await read_exactly(r3, 3) == b"new"
            for w in (w1, w2, w3):
                w.close()

    run(main())


def test_on_open_can_reject() -> None:
    async def reject_odd(info: ConnectionInfo) -> None:
        if info.sequence % 2:
            raise Rejected(f"connection {info.sequence} is odd")

    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}",
                elements=[SimpleElement("gate", on_open=reject_odd)]) as proxy:
            r1, w1 = await asyncio.open_connection(*proxy.address)
            assert await read_to_eof(r1, timeout=2) == b""
            r2, w2 = await asyncio.open_connection(*proxy.address)
            w2.write(b"even")
            assert await read_exactly(r2, 4) == b"even"
            w1.close()
            w2.close()

    run(main())


def test_reply_goes_back_to_the_sender() -> None:
    class Answer(Stage):
        async def data(self, data: bytes, out: Output) -> None:
            if data.startswith(b"PING"):
                await out.reply(b"+PONG from proxy\r\n")
            else:
                await out.send(data)

    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}",
                elements=[SimpleElement("answer", make_up=Answer)]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"PING\r\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"+PONG from proxy\r\n"
            writer.write(b"echo me")
            assert await read_exactly(reader, 7) == b"echo me"
            writer.close()

    run(main())


def test_close_facts_reach_on_close() -> None:
    """on_close sees whether the connection ended with a reset, also when an
    element (not a socket) reset it; and elements attached to a connection that a
    later element refuses get their on_close too."""
    closed: list[tuple[str, bool, str]] = []

    class Resetter(Stage):
        async def data(self, data: bytes, out: Output) -> None:
            if data == b"reset":
                out.reset("asked to")
            else:
                await out.send(data)

    def watcher(name: str) -> SimpleElement:
        def on_close(info: ConnectionInfo, reason: str) -> None:
            closed.append((name, info.reset, reason))
        element = SimpleElement(name, make_up=Resetter)
        original = element.attach

        def attach(info: ConnectionInfo) -> Attachment:
            attachment = original(info)
            attachment.on_close = on_close
            return attachment
        element.attach = attach  # type: ignore[method-assign]
        return element

    async def refuse_third(info: ConnectionInfo) -> None:
        if info.sequence == 3:
            raise Rejected("third")

    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}",
                elements=[watcher("w"), SimpleElement("gate", on_open=refuse_third)]) as proxy:
            r, w = await asyncio.open_connection(*proxy.address)
            w.write(b"hello")
            assert await read_exactly(r, 5) == b"hello"
            w.write_eof()
            assert await read_to_eof(r) == b""
            w.close()
            r, w = await asyncio.open_connection(*proxy.address)
            w.write(b"reset")
            try:
                await read_to_eof(r, timeout=2)
            except ConnectionResetError:
                pass
            w.close()
            r, w = await asyncio.open_connection(*proxy.address)
            assert await read_to_eof(r, timeout=2) == b""
            w.close()
            async with asyncio.timeout(5):
                while len(closed) < 3:
                    await asyncio.sleep(0.01)
        assert closed == [("w", False, "eof"), ("w", True, "element"), ("w", False, "rejected")]

    run(main())


def test_background_sender_keeps_its_place_when_an_element_is_inserted_before_it() -> None:
    """A stage's background task holds its Output; inserting an element in front
    of that stage must not make the task's bytes skip or repeat a stage."""
    class Ticker(Stage):
        """Sends b'tick' downstream-side (onward) from a task, every few ms."""

        def start(self, out: Output) -> None:
            async def tick() -> None:
                for _ in range(40):
                    if not await out.sleep(0.005):
                        return
                    await out.send(b"t")
            self.task = asyncio.get_running_loop().create_task(tick())

        async def data(self, data: bytes, out: Output) -> None:
            await out.send(b"<" + data + b">")

        def close(self) -> None:
            self.task.cancel()

    async def main() -> None:
        async with serve() as port, midway.Proxy(
                "127.0.0.1:0", f"127.0.0.1:{port}",
                elements=[SimpleElement("ticker", make_up=Ticker)]) as proxy:
            reader, writer = await asyncio.open_connection(*proxy.address)
            writer.write(b"x")
            assert await read_exactly(reader, 3) == b"<x>"
            await asyncio.sleep(0.05)
            # Upper before the ticker: the ticker's bytes must not pass through it.
            proxy.add_element(SimpleElement("upper", make_up=Upper), index=0)
            await asyncio.sleep(0.3)
            writer.write(b"y")
            got = b""
            async with asyncio.timeout(5):
                while b"<Y>" not in got:
                    got += await reader.read(100)
            # Ticks go straight on from the ticker's place; data passes both stages.
            assert b"<t>" not in got, got
            assert got.replace(b"<Y>", b"").strip(b"t") == b"", got
            writer.close()

    run(main())
