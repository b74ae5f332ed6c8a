"""Service logs: JSON lines carry the current request id; text lines show it in brackets."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from serving.request_log import configure_logging, current_request_id


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_root_logger")
def test_json_lines_carry_the_request_id(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("json")
    token = current_request_id.set("req-7")
    try:
        logging.getLogger("pdmesh.test").info("prefill of %d tokens", 12)
    finally:
        current_request_id.reset(token)
    logging.getLogger("pdmesh.test").warning("no request here")
    first, second = (json.loads(line) for line in capsys.readouterr().err.splitlines())
    assert first["request_id"] == "req-7" and first["message"] == "prefill of 12 tokens"
    assert first["level"] == "INFO" and first["logger"] == "pdmesh.test"
    assert first["time"].endswith("+00:00")
    assert second["request_id"] == "-" and second["level"] == "WARNING"


@pytest.mark.usefixtures("restore_root_logger")
def test_text_lines_show_the_request_id_and_bad_formats_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    configure_logging("text")
    token = current_request_id.set("abc")
    try:
        logging.getLogger("pdmesh.test").info("decoding")
    finally:
        current_request_id.reset(token)
    assert "[abc] decoding" in capsys.readouterr().err
    with pytest.raises(ValueError, match="log format"):
        configure_logging("xml")


def test_a_flood_of_refusals_logs_one_line_per_reason_and_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from serving.log_limits import ThrottledLog

    now = [0.0]
    throttled = ThrottledLog(logging.getLogger("pdmesh.test.throttle"), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="pdmesh.test.throttle"):
        for _ in range(500):
            throttled.log("wrong key", "refused %s", "Generate")
        throttled.log("missing key", "refused %s", "Abort")  # another reason: its own line
        now[0] = 11.0
        throttled.log("wrong key", "refused %s", "Generate")
    lines = [record.getMessage() for record in caplog.records]
    assert lines == [
        "refused Generate",
        "refused Abort",
        "refused Generate (499 more like it in the last 10 s)",
    ]
