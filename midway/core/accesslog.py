"""The access log: one JSON line per finished connection, an observer like any
other (:mod:`midway.core.observer`); the fields are :class:`CloseRecord`'s."""

from __future__ import annotations

import logging
import sys
from typing import IO

from .observer import CloseRecord, Observer

__all__ = ["AccessLog"]

log = logging.getLogger("midway")


class AccessLog(Observer):
    """Writes one JSON line per finished connection to a file or standard output.

    Each line is written and flushed as the connection closes.  A write error is
    logged once and the access log stops; the proxy goes on."""

    def __init__(self, target: str) -> None:
        self._file: IO[str]
        if target == "-":
            self._file, self._owned = sys.stdout, False
        else:
            self._file, self._owned = open(target, "a", encoding="utf-8"), True
        self._broken = False

    def connection_closed(self, record: CloseRecord) -> None:
        if self._broken:
            return
        try:
            self._file.write(record.to_json() + "\n")
            self._file.flush()
        except (OSError, ValueError) as exc:
            self._broken = True
            log.error("access log: cannot write (%s); access logging stopped", exc)

    def close(self) -> None:
        if self._owned:
            self._file.close()
