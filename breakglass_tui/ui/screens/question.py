"""The base of the console's questions (resume this incident? quit? open this link?).

A question must never swallow what the operator types: someone who opens the console and starts
typing "the devvm is down" before noticing the question would otherwise answer it with the letters
of their message. So a question has no letter keys. Its buttons are answered with ←/→ and Enter
(or a click); printable keys and pastes go to the chat input, shown here as they are typed, and
Enter while something has been typed sends it (it is queued until the console can run it) instead
of answering.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from textual import events
from textual.binding import Binding
from textual.screen import ModalScreen
from textual.widgets import Button, Static

from breakglass_tui.ui.guard import Guarded
from breakglass_tui.ui.sanitize import literal

if TYPE_CHECKING:
    from breakglass_tui.ui.widgets.chat import ChatInput

T = TypeVar("T")

TYPED_HINT = "Typing goes to the message box: "


class KeepsTyping:
    """Mixin for a modal screen: printable keys and pastes go to the chat input behind it (shown
    in its ``.question-typed`` line, if it has one), Enter with something typed sends it."""

    def default_button(self) -> Button | None:
        """The answer Enter gives when nothing has the focus (None: Enter does nothing)."""
        return None

    def typed_line(self) -> Static:
        """Where the text typed meanwhile is shown (put it in the question's box)."""
        return Static("", id="question-typed", classes="question-typed", markup=False)

    def _chat_input(self) -> ChatInput | None:
        from breakglass_tui.ui.widgets.chat import ChatInput

        try:
            return self.app.query_one(ChatInput)
        except Exception:  # no chat input behind this question (a test app): nothing to keep
            return None

    def _show_typed(self, note: str = "") -> None:
        chat = self._chat_input()
        value = chat.value if chat is not None else ""
        with_text = f"{TYPED_HINT}{value}" if value else ""
        if note:
            with_text = f"{with_text}  ({note})" if with_text else note
        for typed in self.query(".question-typed"):
            typed.update(literal(with_text, newlines=False))
            typed.display = bool(with_text)

    def on_mount(self) -> None:
        self._show_typed()

    async def on_key(self, event: events.Key) -> None:
        chat = self._chat_input()
        default = self.default_button() if self.focused is None else None
        if chat is None:  # no message box behind this question: only the Enter fallback
            if event.key == "enter" and default is not None:
                event.stop()
                default.press()
            return
        if event.key == "enter" and chat.value.strip():
            # The operator was writing a message: Enter sends it (queued), not an answer.
            event.stop()
            event.prevent_default()
            text, chat.value = chat.value, ""
            submit = getattr(self.app, "submit", None)
            if submit is not None:
                await submit(text)
            self._show_typed("sent; answer the question with ←/→ and Enter")
        elif event.key == "enter" and default is not None:
            # Nothing has the focus (a browser tab that was not focused when the question
            # came up): Enter gives the answer that would have had it.
            event.stop()
            event.prevent_default()
            default.press()
        elif event.key == "backspace" and chat.value:
            event.stop()
            event.prevent_default()
            chat.value = chat.value[:-1]
            chat.cursor_position = len(chat.value)
            self._show_typed()
        elif event.is_printable and event.character:
            event.stop()
            event.prevent_default()
            self._keep(chat, event.character)

    def on_paste(self, event: events.Paste) -> None:
        chat = self._chat_input()
        if chat is not None and event.text:
            event.stop()
            self._keep(chat, event.text.replace("\r\n", " ").replace("\n", " "))

    def _keep(self, chat: ChatInput, text: str) -> None:
        chat.value += text
        chat.cursor_position = len(chat.value)
        self._show_typed()


class QuestionScreen(KeepsTyping, Guarded, ModalScreen[T]):
    """A modal question whose buttons take ←/→ and Enter; typing goes to the chat input."""

    BINDINGS = [  # noqa: RUF012 - Textual's convention
        Binding("left,up", "app.focus_previous", "Previous", show=False, id="question.previous"),
        Binding("right,down", "app.focus_next", "Next", show=False, id="question.next"),
    ]

    def default_button(self) -> Button | None:
        auto = self.AUTO_FOCUS
        return self.query_one(auto, Button) if auto and auto.startswith("#") else None

    def focus_button(self, button_id: str) -> None:
        self.query_one(f"#{button_id}", Button).focus()

    def button_pressed(self, event: Button.Pressed) -> Any:
        """The id of the pressed button (stops the event)."""
        event.stop()
        return event.button.id
