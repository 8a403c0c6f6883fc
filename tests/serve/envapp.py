"""A tiny real Textual app for the server tests: it records the environment it was given (names,
and the values of a few non-secret ones) to the file named by ENVAPP_OUT, then idles."""

from __future__ import annotations

import json
import os

from textual.app import App, ComposeResult
from textual.widgets import Static

SHOWN = ("BREAKGLASS_OPERATOR", "BREAKGLASS_DEVVM_HOST", "BREAKGLASS_TARGETS_ARE_LAB")


class EnvApp(App[None]):
    def compose(self) -> ComposeResult:
        yield Static("envapp ready")

    def on_mount(self) -> None:
        out = os.environ.get("BREAKGLASS_TEST_ENVAPP_OUT")
        if out:
            doc = {
                "names": sorted(os.environ),
                "values": {k: os.environ.get(k) for k in SHOWN},
                "pid": os.getpid(),
            }
            with open(out, "w") as f:
                json.dump(doc, f)


if __name__ == "__main__":
    EnvApp().run()
