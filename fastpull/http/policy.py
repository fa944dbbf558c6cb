"""The HTTP policy of every request fastpull makes: what an answer means, what is retried, how long
to wait, how many redirects and re-authentications a request may take.

:func:`judge` is a pure function of one finished exchange and the request's counters so far; the
synchronous transport and the fetch engine both act on its :class:`Verdict`, so they cannot
disagree.
"""

from __future__ import annotations

import enum
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import pycurl  # type: ignore[import-untyped]

MAX_REDIRECTS = 10
"""Redirects followed for one request (by the fetch engine: for one blob)."""
MAX_REAUTHENTICATIONS = 2
"""Fresh credentials asked for one request (or blob) after a 401 with a challenge."""
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
"""Statuses that say "try again later": retried with backoff, honouring ``Retry-After``."""
THROTTLE_STATUSES = frozenset({429, 503})
"""Statuses that ask the client to slow down (the fetch engine halves its transfers)."""
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
EXPIRED_STATUSES = frozenset({400, 401, 403})
"""What a CDN or object store answers a signed URL that expired: the origin is asked again."""
SSL_CONNECT_ERROR = pycurl.E_SSL_CONNECT_ERROR
"""What libcurl reports when the server does not speak TLS (its reply is not a TLS record)."""
RETRY_CURL_CODES = frozenset(
    {
        pycurl.E_COULDNT_CONNECT,
        8,  # CURLE_WEIRD_SERVER_REPLY: e.g. the excess of an earlier body on a kept-alive connection
        pycurl.E_HTTP2,
        pycurl.E_PARTIAL_FILE,
        pycurl.E_OPERATION_TIMEDOUT,  # also a stall (CURLOPT_LOW_SPEED_TIME)
        pycurl.E_SSL_CONNECT_ERROR,
        pycurl.E_GOT_NOTHING,
        pycurl.E_SEND_ERROR,
        pycurl.E_RECV_ERROR,
        92,  # CURLE_HTTP2_STREAM
    }
)
"""Transfer failures that another try may not meet (a reset, a timeout, a broken stream)."""


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry transient failures: connection errors, 408, 425, 429, 5xx."""

    attempts: int = 4
    """Tries in all, the first included."""
    base_delay: float = 0.25
    """Backoff before the second try; it doubles each time, jittered down to half."""
    max_delay: float = 10.0
    """Longest backoff; a ``Retry-After`` of up to four times this is honoured, a longer one ends
    the retries (a registry asking for an hour gets a clear error, not an hour's wait)."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1")
        if self.base_delay < 0 or self.max_delay < 0:
            raise ValueError("delays must not be negative")

    def backoff(self, attempt: int) -> float:
        """Jittered exponential wait before try ``attempt + 1`` (``attempt`` counts from 1)."""
        delay = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return random.uniform(delay / 2, delay)


class Action(enum.Enum):
    DONE = "done"
    """The answer is what was asked for (or, for the transport, final: the caller reads it)."""
    FOLLOW = "follow"
    """Go to ``Verdict.location``."""
    RESOLVE_AGAIN = "resolve again"
    """A signed redirect target refused us: ask the origin for a fresh one."""
    REAUTHENTICATE = "reauthenticate"
    """Answer the 401's challenge with fresh credentials, then try again."""
    RETRY = "retry"
    """Try again after ``Verdict.delay`` seconds."""
    FAIL = "fail"
    """Give up; ``Verdict.why`` says why."""


class Verdict(NamedTuple):
    action: Action
    delay: float = 0.0
    location: str | None = None
    why: str = ""


class Exchange(NamedTuple):
    """One finished request as the policy sees it."""

    status: int
    """The HTTP status, 0 if no response arrived."""
    headers: Mapping[str, str]
    """Response headers, looked up by lower-case name."""
    curl_code: int = 0
    curl_message: str = ""
    complete: bool = True
    """Whether the body arrived whole (a 2xx whose body broke off is not)."""
    elsewhere: bool = False
    """The request went to another host than the origin's (a redirect target: a CDN, S3)."""


class Counters(NamedTuple):
    """What a request (or, in the engine, a blob) has used up so far."""

    tries: int = 1
    """Tries made of this request, the one just finished included."""
    redirects: int = 0
    reauthentications: int = 0
    resolutions: int = 0
    """Fresh redirects asked for in a row since a redirect target last worked."""


def judge(exchange: Exchange, counters: Counters, policy: RetryPolicy) -> Verdict:
    """What to do after ``exchange``: pure, so the transport and the engine act alike."""
    status, code = exchange.status, exchange.curl_code
    if code == 0 and 200 <= status < 300 and exchange.complete:
        return Verdict(Action.DONE)
    if code == 0 and status in REDIRECT_STATUSES and "location" in exchange.headers:
        if counters.redirects >= MAX_REDIRECTS:
            return Verdict(Action.FAIL, why=f"more than {MAX_REDIRECTS} redirects")
        return Verdict(Action.FOLLOW, location=exchange.headers["location"])
    if code == 0 and exchange.elsewhere and status in EXPIRED_STATUSES:
        if counters.resolutions >= policy.attempts:
            return Verdict(Action.FAIL, why=f"HTTP {status} from the redirect target, {counters.resolutions} "
                                            "fresh redirects in a row")
        return Verdict(Action.RESOLVE_AGAIN)
    if code == 0 and status == 401:
        if "www-authenticate" in exchange.headers and counters.reauthentications < MAX_REAUTHENTICATIONS:
            return Verdict(Action.REAUTHENTICATE)
        return Verdict(Action.FAIL, why=f"HTTP {status}")
    if code == 0 and status and status not in RETRY_STATUSES and not 200 <= status < 300:
        return Verdict(Action.FAIL, why=f"HTTP {status}")
    if code and code not in RETRY_CURL_CODES:
        return Verdict(Action.FAIL, why=exchange.curl_message or f"curl error {code}")
    # Transient: a transfer error, a retryable status, or a body that broke off.
    why = exchange.curl_message or (f"HTTP {status}" if status and not 200 <= status < 300 else "short body")
    if counters.tries >= policy.attempts:
        return Verdict(Action.FAIL, why=f"{why} after {counters.tries} tries")
    wait = retry_after(exchange.headers.get("retry-after"))
    if wait > policy.max_delay * 4:
        return Verdict(Action.FAIL, why=f"{why}; the server asks to wait {wait:.0f} s")
    return Verdict(Action.RETRY, delay=max(policy.backoff(counters.tries), wait), why=why)


def retry_after(value: str | None) -> float:
    """Seconds asked by a ``Retry-After`` header (delta-seconds or HTTP date); 0 if absent or bad."""
    if not value:
        return 0.0
    if value.strip().isdigit():
        return float(value)
    try:
        import email.utils  # rare: Retry-After as an HTTP date (imported here to keep start-up short)

        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 0.0
