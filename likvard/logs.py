"""Logging for every process: plain text on a terminal, JSON lines in containers.

`LIKVARD_LOG_FORMAT=json` (the image's default) writes one JSON object a line with the
time, level, logger, service, message and the active trace and span ids, so a log line
leads to its trace. No personal data: Likvärd's own messages never hold any, and of an
exception only its type and where it happened are written, not its text (which may quote
submitted values, e.g. a database error's detail).
"""

from __future__ import annotations

import json
import logging
import logging.config
import os
import traceback
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

from opentelemetry import trace

FORMAT_ENV = "LIKVARD_LOG_FORMAT"
LEVEL_ENV = "LIKVARD_LOG_LEVEL"


def _where(tb: TracebackType | None) -> str:
    """Where an exception happened: its traceback's frames, without its text."""
    return "".join(traceback.format_tb(tb))


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "service": self.service,
            "message": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["where"] = _where(record.exc_info[2])
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The terminal format; exceptions, as in JSON, without their text."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatException(self, ei: object) -> str:
        if not isinstance(ei, tuple) or ei[0] is None:
            return ""
        return f"{ei[0].__name__}; where:\n" + _where(ei[2]).rstrip()


def formatter_for(service: str) -> logging.Formatter:
    """JSON lines if LIKVARD_LOG_FORMAT=json, else text."""
    if os.environ.get(FORMAT_ENV, "text").lower() == "json":
        return JsonFormatter(service)
    return TextFormatter()


def log_config(service: str) -> dict[str, Any]:
    """The logging configuration (dictConfig) of a process: uvicorn applies it in each of
    its worker processes too, and its own loggers propagate to the root."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"likvard": {"()": formatter_for, "service": service}},
        "handlers": {"default": {"class": "logging.StreamHandler", "formatter": "likvard"}},
        "root": {"handlers": ["default"], "level": os.environ.get(LEVEL_ENV, "INFO").upper()},
        "loggers": {
            name: {"handlers": [], "propagate": True}
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def setup_logging(service: str) -> None:
    """Configure this process's logging (`log_config`)."""
    logging.config.dictConfig(log_config(service))
