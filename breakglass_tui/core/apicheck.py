"""The self-check's Messages API link: the key is accepted and the configured model exists.

The cheapest call the API offers for both is ``GET /v1/models/{model}`` (the Models API): no
generation, no tokens spent. It goes through the real anthropic SDK, as the breakglass agent's
calls do (same key, same base URL), with no retries and our own deadline.
"""

from __future__ import annotations

import asyncio
import importlib
from typing import Any


async def check_messages_api(
    api_key: str, model: str, *, base_url: str | None = None, timeout_s: float = 15.0
) -> tuple[bool, str]:
    """(ok, sentence): whether the API accepts ``api_key`` and knows ``model``."""
    # Imported off the event loop: the SDK takes seconds to import.
    anthropic: Any = await asyncio.to_thread(importlib.import_module, "anthropic")
    client = anthropic.AsyncAnthropic(
        api_key=api_key, base_url=base_url or None, max_retries=0, timeout=timeout_s
    )
    try:
        info = await client.models.retrieve(model)
    except anthropic.AuthenticationError:
        return False, (
            "the API refused the key (401): ANTHROPIC_API_KEY is wrong or revoked; put a valid"
            " key in the Secret the chart mounts (docs/install.md)"
        )
    except anthropic.PermissionDeniedError:
        return False, (
            "the API key may not use the Models API or this model (403): check the key's"
            " workspace and permissions in the Console"
        )
    except anthropic.NotFoundError:
        return False, (
            f"the API does not know the model {model!r} (404): set BREAKGLASS_MODEL to a"
            " current model (README: the model)"
        )
    except anthropic.APITimeoutError:
        return False, f"the API did not answer within {timeout_s:g}s"
    except anthropic.APIConnectionError:
        return False, (
            "cannot reach the API (connection failed): check the pod's egress to"
            " api.anthropic.com (NetworkPolicy, proxy)"
        )
    except anthropic.APIStatusError as exc:
        return False, f"the API answered {exc.status_code} to the model lookup"
    finally:
        await client.close()
    name = getattr(info, "display_name", None) or info.id
    return True, f"key accepted; model {info.id} ({name}) exists"
