"""The image test's figures (build time, size, first frame, stop on SIGTERM) in the summary."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    from tests.image.images import FIGURES

    if FIGURES:
        terminalreporter.section("image figures")
        for name, value in FIGURES.items():
            terminalreporter.write_line(f"{name}: {value}")
