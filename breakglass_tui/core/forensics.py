"""A forensics bundle as Claude sees it: its files become outputs, its screendump an image.

The PVE host's ``breakglass-verb`` captures a bundle before every mutating verb and on
``forensics`` (host dmesg, ``qm status``, QMP ``query-status``/``query-block``, the kvm threads'
states, the journal lines, a screendump of the guest's console). Claude gets, in the tool result
of that verb: one line per file with the ``output_id`` to ``read_output``/``grep_output`` it
(the files are stored like every output, within the same limits), the VM's state files inline
when they are short, and the screendump as an image block (it shows a kernel panic, an OOM
report, an emergency shell) when it is within the image limit.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breakglass_tui.core.fence import Fence
from breakglass_tui.core.outputs import OutputRecord, OutputStore

if TYPE_CHECKING:
    from anthropic.types.beta import BetaImageBlockParam

SCREENDUMP = "screendump.png"
# What each capture step's file holds, for the listing (the verb's step names, which its document
# calls probes: breakglass_verb.py).
LABELS = {
    "qmp_query_status.txt": "QMP query-status (running, paused on an I/O error, ...)",
    "qm_status.txt": "qm status --verbose",
    "qmp_query_block.txt": "QMP query-block (disks, io-status)",
    "qmp_query_blockstats.txt": "QMP query-blockstats",
    "dmesg.txt": "host dmesg (hung tasks, I/O errors, OOM)",
    "proc_threads.txt": "kvm threads: stat, wchan, kernel stack (D state)",
    "proc_stat.txt": "kvm /proc/<pid>/stat",
    "proc_status.txt": "kvm /proc/<pid>/status",
    "proc_wchan.txt": "kvm wchan",
    "proc_io.txt": "kvm /proc/<pid>/io",
    "journal_vm_scope.txt": "host journal of the VM's scope",
    "journal_pvestatd.txt": "host journal of pvestatd",
    "host_pressure.txt": "host pressure (cpu, memory, io)",
    "vm_cgroup_pressure.txt": "the VM's cgroup pressure",
    "meminfo.txt": "host /proc/meminfo",
    "loadavg.txt": "host /proc/loadavg",
    "qm_config.txt": "qm config",
}
# Shown inline when short: the VM's state at a glance.
INLINE = ("qmp_query_status.txt", "qm_status.txt")
INLINE_MAX_BYTES = 600
MAX_IMAGE_SIDE = 8000  # the API refuses larger images


@dataclass
class BundleView:
    """The bundle's part of a tool result."""

    text: str
    image: BetaImageBlockParam | None = None  # the screendump
    outputs: dict[str, OutputRecord] = field(default_factory=dict)  # file name -> its output


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a PNG, or None if ``data`` is not one."""
    if len(data) < 24 or not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def bundle_view(
    bundle_id: str,
    doc: dict[str, Any],
    store: OutputStore,
    *,
    image_limit_bytes: int,
    fence: Fence,
) -> BundleView:
    """Store each file of a fetched bundle (``{"manifest", "files": {name: base64}}``) as an
    output and describe it for Claude; the screendump as an image within the image limit. What
    the host wrote (a state file shown inline, a file name the verb does not produce) is inside
    ``fence``, the tool result's one fence (core.fence)."""
    files: dict[str, bytes] = {}
    for name, b64 in sorted((doc.get("files") or {}).items()):
        safe = Path(str(name)).name  # never a path from the host
        if not safe or safe.startswith("."):
            continue
        try:
            files[safe] = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError, TypeError):
            continue
    view = BundleView(text="")
    lines = [f"forensics bundle {bundle_id}: its files are outputs (read_output/grep_output):"]
    others: list[str] = []  # files the verb does not produce: their names are the host's text
    for name, data in files.items():
        if name == SCREENDUMP:
            continue
        recorder = store.recorder()
        recorder.feed_text(data.decode("utf-8", "replace"))
        record, _ = store.finish(recorder)
        view.outputs[name] = record
        if name not in LABELS:
            others.append(f"{name}: output_id {record.output_id}, {record.raw_bytes} bytes")
            continue
        lines.append(
            f"- {name} ({LABELS[name]}): output_id {record.output_id}, {record.raw_bytes} bytes"
        )
        if name in INLINE and 0 < len(data) <= INLINE_MAX_BYTES:
            shown = record.head.decode("utf-8", "replace").strip()  # scrubbed, like every output
            lines.append(fence.wrap(shown))
    if others:
        lines.append(f"- {len(others)} other file(s), named by the host:")
        lines.append(fence.wrap("\n".join(others)))
    png = files.get(SCREENDUMP)
    if png is None:
        lines.append("- no screendump in this bundle (QMP did not answer, or over its byte cap)")
    else:
        size = png_size(png)
        if size is None:
            lines.append(f"- {SCREENDUMP}: not a PNG, not shown")
        elif len(png) > image_limit_bytes or max(size) > MAX_IMAGE_SIDE:
            lines.append(
                f"- {SCREENDUMP} ({size[0]}x{size[1]}, {len(png)} bytes): over the image limit"
                f" ({image_limit_bytes} bytes), not shown; it is kept in the bundle"
            )
        else:
            lines.append(
                f"- {SCREENDUMP} ({size[0]}x{size[1]}): the guest's console before the verb"
                " acted, attached as an image"
            )
            view.image = {
                "type": "image",
                "source": {
                    "type": "base64",
                    "media_type": "image/png",
                    "data": base64.b64encode(png).decode("ascii"),
                },
            }
    view.text = "\n".join(lines)
    return view
