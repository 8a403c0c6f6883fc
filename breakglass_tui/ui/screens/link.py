"""A link in Claude's answer is shown and asked about before it opens.

Model text is outside text: a link's visible words can say one thing and its target another, so
a click shows the whole URL first. Only http and https links open (in a new browser tab, or the
terminal's browser); anything else (``javascript:``, ``file:``, a custom scheme) is shown and
refused."""

from __future__ import annotations

from urllib.parse import urlsplit

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Button, Static

from breakglass_tui.ui.sanitize import literal
from breakglass_tui.ui.screens.question import QuestionScreen

OPENABLE = ("http", "https")


def openable(url: str) -> bool:
    """True for an absolute http(s) URL with a host and nothing invisible in it."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    return parts.scheme.lower() in OPENABLE and bool(parts.netloc) and url.isprintable()


class LinkScreen(QuestionScreen[bool]):
    """Dismisses with True when the operator chose to open ``url`` (an openable one)."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("escape", "choose(False)", "Cancel", id="link.cancel"),
    ]
    AUTO_FOCUS = "#cancel"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.allowed = openable(url)

    def compose(self) -> ComposeResult:
        with Vertical(id="link-box"):
            yield Static("Claude's answer links to:", markup=False)
            yield Static(literal(self.url), id="link-url")
            yield Static(
                "Open it in a new tab? Check the address first: the words of a link can say"
                " something else."
                if self.allowed
                else "Not opened: only http and https links open from the console.",
                markup=False,
                id="link-hint",
            )
            yield self.typed_line()
            with Horizontal(id="link-buttons"):
                if self.allowed:
                    yield Button("Open", id="open", variant="warning")
                yield Button("Cancel", id="cancel", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(self.button_pressed(event) == "open" and self.allowed)

    def action_choose(self, open_: bool) -> None:
        self.dismiss(open_ and self.allowed)
