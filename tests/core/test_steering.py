"""Messages the operator queues while Claude works reach Claude at the next step boundary, after
the tool results, as new operator messages (real SDK, fake Messages API)."""

from __future__ import annotations

import asyncio

from breakglass_tui.core.events import OperatorMessage
from breakglass_tui.core.steering import STEERING_NOTE, OperatorQueue
from tests.core.conftest import ScriptedHost
from tests.core.test_loop import assert_tool_results_first
from tests.support import fake_messages_api as fm


def test_queue_keeps_order_and_can_be_edited_and_dropped():
    queue = OperatorQueue()
    changes: list[int] = []
    queue.subscribe(lambda: changes.append(len(queue)))
    first = queue.add("the devvm is down")
    second = queue.add("/sh uptime")
    third = queue.add("and check the disk")
    assert [i.text for i in queue.items] == [
        "the devvm is down",
        "/sh uptime",
        "and check the disk",
    ]
    assert queue.edit(first.id, "the devvm is down, fix it")
    assert not queue.edit(999, "gone")
    # Steering takes the head up to the first slash command: the operator's order is kept.
    assert [i.text for i in queue.take_steering()] == ["the devvm is down, fix it"]
    assert queue.take_steering() == []
    assert queue.next() == second
    assert queue.edit(third.id, "  ") is True and len(queue) == 0, "empty text drops"
    assert changes, "listeners hear every change"


async def test_a_queued_message_reaches_claude_after_the_tool_results(make_agent, fake_api):
    host = ScriptedHost(outputs={"df -h": "/ 100%\n"}, delay_s=0.3)
    h = make_agent(host)
    queue = h.agent.operator_queue = OperatorQueue()
    fake_api.push(
        fm.tool("toolu_1", "devvm_shell", {"command": "df -h"}),
        fm.text("Noted: I will not reboot."),
    )
    turn = asyncio.create_task(h.agent.handle("why is the devvm slow?"))
    while not host.ran:
        await asyncio.sleep(0.01)
    queue.add("do not reboot it, it runs a migration")
    await asyncio.wait_for(turn, 30)

    assert len(fake_api.bodies) == 2
    last_user = fake_api.bodies[1]["messages"][-1]
    assert last_user["role"] == "user"
    kinds = [b["type"] for b in last_user["content"]]
    assert kinds == ["tool_result", "text"], kinds
    steering = last_user["content"][1]["text"]
    assert steering.startswith(STEERING_NOTE) and "runs a migration" in steering
    assert_tool_results_first(fake_api.bodies)
    assert len(queue) == 0
    # Delivered = a new operator message: emitted (the console shows it) and audited.
    texts = [e.text for e in h.of(OperatorMessage)]
    assert texts == ["why is the devvm slow?", "do not reboot it, it runs a migration"]
    queued = [r for r in h.audit() if r["kind"] == "operator_message" and r.get("queued")]
    assert [r["text"] for r in queued] == ["do not reboot it, it runs a migration"]


async def test_a_queued_slash_command_waits_for_the_turn_to_end(make_agent, fake_api):
    host = ScriptedHost(delay_s=0.3)
    h = make_agent(host)
    queue = h.agent.operator_queue = OperatorQueue()
    fake_api.push(fm.tool("toolu_1", "devvm_shell", {"command": "uptime"}), fm.text("Done."))
    turn = asyncio.create_task(h.agent.handle("look at the load"))
    while not host.ran:
        await asyncio.sleep(0.01)
    queue.add("/status")
    queue.add("then tell me")
    await asyncio.wait_for(turn, 30)
    last_user = fake_api.bodies[1]["messages"][-1]
    assert [b["type"] for b in last_user["content"]] == ["tool_result"]
    assert [i.text for i in queue.items] == ["/status", "then tell me"]
