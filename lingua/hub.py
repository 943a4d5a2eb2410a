"""Whether the model/data hub can be reached, answered fast.

Setup scripts (tokenizer and data downloads) and evaluation on hub-hosted tasks ask this first,
so an offline machine gets one clear message at once instead of minutes of retries.
"""

from __future__ import annotations

import threading
import urllib.error
import urllib.request


def hub_unreachable_reason(endpoint: str, timeout_s: float = 4.0) -> str | None:
    """None when `endpoint` answers an HTTP request (any status) within `timeout_s`, else why not.

    The probe runs in a daemon thread that is abandoned at the deadline, so a hanging name
    lookup (which ignores socket timeouts) cannot hold the caller up either.
    """
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout_s).close()
            outcome.append(None)
        except urllib.error.HTTPError:
            outcome.append(None)  # an error status is still an answer
        except (OSError, ValueError) as error:
            outcome.append(str(getattr(error, "reason", error)))

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 1.0)
    return outcome[0] if outcome else f"no answer within {timeout_s:.0f} s"
