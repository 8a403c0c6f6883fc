"""The help screen (F1 or ?): keys and slash commands."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen

from breakglass_tui.ui.widgets.chat import SLASH_COMMANDS

KEYS = (
    ("Enter", "send the message or slash command"),
    ("→", "accept the suggested slash command"),
    ("↑ / ↓", "input history"),
    ("Esc", "cancel the running turn or command"),
    ("F1 or ?", "this help"),
    ("F2 / F3 / F4", "focus chat / live output / forensics"),
    ("d or Enter", "in forensics: download the selected bundle"),
    ("Ctrl+P", "command palette: verbs, probe, incident report"),
    ("Ctrl+Q", "quit (asks first while an action runs)"),
)


def help_markdown() -> str:
    keys = "\n".join(f"| `{key}` | {what} |" for key, what in KEYS)
    commands = "\n".join(f"| `{cmd}` | {what} |" for cmd, what in SLASH_COMMANDS)
    return (
        "# breakglass — help\n\n"
        "Warm case only: the devvm is wedged while the cluster is healthy. If the PVE host or the"
        " cluster is down (the cold case), use your site's cold path: the console names it"
        " (BREAKGLASS_COLD_PATH_POINTER) when it finds the PVE host unreachable.\n\n"
        f"| key | does |\n|---|---|\n{keys}\n\n"
        f"| command | does |\n|---|---|\n{commands}\n\n"
        "Mutating verbs (reset, stop, start, cycle) capture a forensics bundle first, always.\n"
    )


class HelpScreen(ModalScreen[None]):
    """Keys and slash commands; Esc, F1 or q closes it."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("escape,f1,q,question_mark", "dismiss", "Close", id="help.close"),
    ]

    def compose(self) -> ComposeResult:
        from textual.widgets import Markdown  # markdown-it: only when help is first opened

        with VerticalScroll(id="help-body"):
            yield Markdown(help_markdown())
