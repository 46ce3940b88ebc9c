"""The projection worker's span per event is made only when spans go somewhere: with no
exporter it was a third of the applying thread's time for traces nobody receives."""

from __future__ import annotations

import time
from typing import Any

import pytest

from likvard import telemetry
from likvard.inbox import Incoming
from services.projections import worker


class CountingTracer:
    def __init__(self) -> None:
        self.started: list[str] = []

    def start_span(self, name: str, **_: Any) -> Any:
        self.started.append(name)
        return self

    def end(self, **_: Any) -> None:
        pass


def events(n: int) -> list[Incoming]:
    return [
        Incoming("t", 0, i, f"e{i}", "IntakeRegistered", "c", {"traceparent": None}, {})
        for i in range(n)
    ]


@pytest.mark.parametrize(("exported", "expected"), [(False, 0), (True, 3)])
def test_a_span_per_event_only_when_spans_are_exported(
    monkeypatch: pytest.MonkeyPatch, exported: bool, expected: int
) -> None:
    tracer = CountingTracer()
    monkeypatch.setattr(worker, "_tracer", tracer)
    monkeypatch.setattr(telemetry, "_exported", exported)
    assert telemetry.spans_exported() is exported
    worker._spans(events(3), None, time.time_ns())
    assert tracer.started == ["project IntakeRegistered"] * expected
