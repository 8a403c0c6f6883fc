"""The help screen (F1 or ?): keys and slash commands."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen

from breakglass_tui.core import slash
from breakglass_tui.ui.guard import Guarded
from breakglass_tui.ui.screens.question import KeepsTyping

KEYS = (
    ("Enter", "send the message or slash command (queued while something runs)"),
    ("→", "accept the suggested slash command"),
    ("↑ / ↓", "input history; ↑ on an empty input edits the newest queued message"),
    ("Esc", "cancel the running turn or command (queued messages go next)"),
    ("F1 or ?", "this help"),
    ("F2 / F3 / F4", "focus chat / live output / forensics"),
    ("d or Enter", "in forensics: download the selected bundle"),
    ("Ctrl+P", "command palette: verbs, probe, incident report"),
    ("Ctrl+Q", "quit (asks first while an action runs: Ctrl+Q again quits)"),
    ("← / →, Enter", "answer a question; what you type meanwhile goes to the message box"),
    ("Ctrl+Y", "run the mutating verb Claude asks approval for (past its per-message limit)"),
)


def help_markdown() -> str:
    keys = "\n".join(f"| `{key}` | {what} |" for key, what in KEYS)
    commands = "\n".join(f"| `{c.shown}` | {c.help} |" for c in slash.COMMANDS)
    return (
        "# breakglass — help\n\n"
        "Warm case only: the devvm is wedged while the cluster is healthy. If the PVE host or the"
        " cluster is down (the cold case), use your site's cold path: the console names it"
        " (BREAKGLASS_COLD_PATH_POINTER) when it finds the PVE host unreachable.\n\n"
        f"| key | does |\n|---|---|\n{keys}\n\n"
        f"| command | does |\n|---|---|\n{commands}\n\n"
        "Mutating verbs (reset, stop, start, cycle) capture a forensics bundle first, always.\n\n"
        "What you send while Claude or a command works is queued (shown above the input) and"
        " delivered at the next turn boundary: Claude reads it between two of its steps, after"
        " the result of the command it just ran. Slash commands queue too and run in order.\n"
    )


class HelpScreen(KeepsTyping, Guarded, ModalScreen[None]):
    """Keys and slash commands; Esc, F1 or ? closes it. Letters typed while it is open go to
    the message box (no letter closes it: "q" in "quota" must not)."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("escape,f1,question_mark", "dismiss", "Close", id="help.close"),
    ]

    def compose(self) -> ComposeResult:
        from textual.widgets import Markdown  # markdown-it: only when help is first opened

        with VerticalScroll(id="help-body"):
            yield self.typed_line()
            yield Markdown(help_markdown())
