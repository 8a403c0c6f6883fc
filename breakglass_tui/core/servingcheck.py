"""The self-check's serving-path link (optional, off by default): the public URL's page answers
through the ingress, as the owner's browser would reach it.

Only where the pod can reach its own public URL (hairpin through the ingress). Redirects are not
followed: the auth proxy answering with its sign-in (a redirect, or 401 for the basic-auth
fallback) proves the route and its middleware are there. A 404 (no route), 5xx (no backend, a
missing middleware) or no answer is a broken link.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def _fetch(url: str, timeout_s: float) -> int:
    opener = urllib.request.build_opener(_NoRedirect)
    # The configured public URL (checked to be http(s) by the caller), not outside input.
    request = urllib.request.Request(  # noqa: S310
        url, method="GET", headers={"User-Agent": "breakglass-selfcheck"}
    )
    try:
        with opener.open(request, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


async def check_serving_path(url: str, *, timeout_s: float = 15.0) -> tuple[bool, str]:
    """(ok, sentence) for a GET of ``url`` (the public URL), redirects not followed."""
    if not url.startswith(("https://", "http://")):
        return False, "no BREAKGLASS_PUBLIC_URL to fetch"
    try:
        status = await asyncio.wait_for(asyncio.to_thread(_fetch, url, timeout_s), timeout_s + 1)
    except (TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", None) or type(exc).__name__
        return False, (
            f"the public URL did not answer ({str(reason)[:120]}): check the ingress, its DNS"
            " and that the pod may reach it (hairpin)"
        )
    if status < 400 or status == 401:
        return True, f"the public URL answers through the ingress ({status})"
    return False, (
        f"the public URL answers {status}: the ingress route or its middleware is broken (check"
        " the Ingress or IngressRoute and the auth middleware's name)"
    )
