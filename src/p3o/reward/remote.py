"""A reward served over HTTP, the convention of OpenRLHF's and verl's remote reward models.

POST `url` with `{"prompts": [...], "completions": [...], "completion_ids": [...], **columns}` (one
entry per response, as a reward function receives them) and read `{"rewards": [...]}`. Timeouts,
HTTP 429/5xx and connection errors are retried with exponential back-off; then the run stops with
one line that carries the server's own error text (its last checkpoint stays as it was).
"""
from __future__ import annotations

import json
import logging
import socket
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit

from p3o.errors import RewardError, UsageError
from p3o.reward.functions import check_rewards

log = logging.getLogger("p3o")


class RemoteReward:
    def __init__(self, url: str, timeout: float = 60.0, max_retries: int = 5, backoff: float = 1.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--reward_url {url} is not an http(s) URL")
        self.url, self.name = url, parts.path.strip("/").replace("/", "_") or parts.hostname
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self._check_reachable(parts)

    def _check_reachable(self, parts) -> None:
        """Before anything expensive: a server that is not listening is one line now, not after loading."""
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=min(self.timeout, 10.0)).close()
        except OSError as exc:
            raise UsageError(f"--reward_url {self.url}: cannot connect to {parts.hostname}:{port} ({exc}); start the "
                             "reward server or fix the URL") from None

    def __call__(self, prompts: list, completions: list, **kwargs):
        body = json.dumps({"prompts": prompts, "completions": completions, **kwargs}, default=str).encode()
        reply = self._post(body)
        try:
            rewards = json.loads(reply)["rewards"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise RewardError(f"reward URL {self.url} must answer JSON {{\"rewards\": [...]}}, got "
                              f"{reply[:200]!r}") from None
        return check_rewards(rewards, len(completions), f"URL {self.url}")

    def _post(self, body: bytes) -> bytes:
        attempts, problem = self.max_retries + 1, ""
        for attempt in range(attempts):
            request = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                text = exc.read()[:300].decode("utf-8", "replace").strip()
                problem = f"HTTP {exc.code}" + (f": {text}" if text else "")
                if exc.code != 429 and exc.code < 500:  # the request itself is wrong: retrying cannot help
                    raise RewardError(f"reward URL {self.url} refused the batch ({problem})") from None
            except (urllib.error.URLError, OSError) as exc:  # refused, reset, timed out: a restarting server
                reason = getattr(exc, "reason", exc)
                problem = f"{type(reason).__name__}: {reason}".rstrip(": ")
            if attempt + 1 < attempts:
                wait = min(self.backoff * 2 ** attempt, 60.0)
                log.warning("reward URL %s: %s; retrying in %.1f s (%d of %d)", self.url, problem, wait, attempt + 1,
                            self.max_retries)
                time.sleep(wait)
        raise RewardError(f"reward URL {self.url} failed {attempts} times (last: {problem}); check the server, or "
                          "raise --reward_url_retries / --reward_url_timeout, then resume from the last checkpoint "
                          "with --resume")
