"""Prometheus metrics on the health port (``/metrics``), with the prometheus-client library.

Per link of the rescue path (the self-check, ``core.selfcheck``): up, the time of the last
success, the last check's latency. Beside them: the open sessions (tabs), the forced-command verbs
run and the model's tokens, counted from the audit records the tabs write (the server tails them
for the log pipeline anyway). A registry of this server's own: nothing of the process's default
collectors leaks in, and two servers in one test process do not share counters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from breakglass_tui.core.selfcheck import LINKS

__all__ = ["CONTENT_TYPE_LATEST", "Metrics"]

TOKEN_KINDS = (
    "input_tokens",
    "output_tokens",
    "cache_creation_input_tokens",
    "cache_read_input_tokens",
)


class Metrics:
    """The server's metrics. :meth:`render` is the ``/metrics`` body."""

    def __init__(self, sessions: Callable[[], int]) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.link_up = Gauge(
            "breakglass_link_up",
            "1 when the link of the rescue path passed its last self-check, 0 when broken"
            " (a link the setup does not use has no sample)",
            ["link"],
            registry=registry,
        )
        self.link_last_success = Gauge(
            "breakglass_link_last_success_timestamp_seconds",
            "Unix time of the link's last successful self-check",
            ["link"],
            registry=registry,
        )
        self.link_latency = Gauge(
            "breakglass_link_latency_seconds",
            "How long the link's last self-check took",
            ["link"],
            registry=registry,
        )
        self.selfcheck_last_run = Gauge(
            "breakglass_selfcheck_last_run_timestamp_seconds",
            "Unix time of the last self-check run",
            registry=registry,
        )
        self.sessions = Gauge(
            "breakglass_sessions", "Console tabs open now (one app process each)", registry=registry
        )
        self.sessions.set_function(lambda: float(sessions()))
        self.verbs = Counter(
            "breakglass_verbs",
            "Forced-command verbs run on the PVE host by the consoles, by verb and outcome",
            ["verb", "ok"],
            registry=registry,
        )
        self.tokens = Counter(
            "breakglass_model_tokens",
            "Tokens of the model's turns, by kind (input, output, cache writes and reads)",
            ["kind"],
            registry=registry,
        )

    def update_links(self, snapshot: Mapping[str, Any]) -> None:
        """Set the per-link gauges from a self-check snapshot (``SelfCheck.snapshot``)."""
        if snapshot.get("checked_at"):
            self.selfcheck_last_run.set(float(snapshot["checked_at"]))
        for link in snapshot.get("links") or []:
            name = str(link.get("link"))
            if name not in LINKS:
                continue
            status = link.get("status")
            if status in ("ok", "broken"):
                self.link_up.labels(name).set(1.0 if status == "ok" else 0.0)
            else:
                # Not used (or not checked yet): no sample, so no alert can fire on it.
                for gauge in (self.link_up, self.link_latency):
                    with contextlib.suppress(KeyError):
                        gauge.remove(name)
                continue
            if isinstance(link.get("latency_s"), int | float):
                self.link_latency.labels(name).set(float(link["latency_s"]))
            if isinstance(link.get("last_success"), int | float):
                self.link_last_success.labels(name).set(float(link["last_success"]))

    def observe_audit(self, record: Mapping[str, Any]) -> None:
        """Count what an audit record says: a verb run, a model turn's tokens."""
        kind = record.get("kind")
        if kind == "verb_result":
            verb = str(record.get("verb") or "unknown")[:20]
            self.verbs.labels(verb, "true" if record.get("ok") else "false").inc()
        elif kind == "model_turn":
            usage = record.get("usage")
            if isinstance(usage, Mapping):
                for name in TOKEN_KINDS:
                    value = usage.get(name)
                    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                        self.tokens.labels(name.removesuffix("_tokens")).inc(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
