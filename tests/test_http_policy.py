"""The HTTP policy (fastpull.http.policy.judge): one table of what each answer means, for the
transport and the fetch engine alike."""

from __future__ import annotations

import email.utils
import time

import pytest

from fastpull.http.policy import (
    MAX_REAUTHENTICATIONS,
    MAX_REDIRECTS,
    RETRY_STATUSES,
    Action,
    Counters,
    Exchange,
    RetryPolicy,
    judge,
    retry_after,
)

POLICY = RetryPolicy(attempts=3, base_delay=0.1, max_delay=1.0)
CHALLENGE = {"www-authenticate": 'Bearer realm="https://auth.example/token"'}


def verdict(status=200, headers=None, curl_code=0, *, complete=True, elsewhere=False, **counters):
    return judge(Exchange(status, headers or {}, curl_code, "", complete=complete, elsewhere=elsewhere),
                 Counters(**counters), POLICY)


@pytest.mark.parametrize(("exchange", "action"), [
    (dict(status=200), Action.DONE),
    (dict(status=206), Action.DONE),
    (dict(status=206, complete=False), Action.RETRY),  # the body broke off
    (dict(status=307, headers={"location": "https://cdn.example/x"}), Action.FOLLOW),
    (dict(status=307), Action.FAIL),  # a redirect to nowhere
    (dict(status=403, elsewhere=True), Action.RESOLVE_AGAIN),  # an expired signed URL
    (dict(status=400, elsewhere=True), Action.RESOLVE_AGAIN),
    (dict(status=403), Action.FAIL),  # the registry itself refuses
    (dict(status=401, headers=CHALLENGE), Action.REAUTHENTICATE),
    (dict(status=401), Action.FAIL),  # no challenge to answer
    (dict(status=404), Action.FAIL),
    (dict(status=0, curl_code=56), Action.RETRY),  # connection reset
    (dict(status=0, curl_code=28), Action.RETRY),  # timeout, or a stall
    (dict(status=0, curl_code=8), Action.RETRY),  # a garbled status line (an earlier body ran over)
    (dict(status=0, curl_code=60), Action.FAIL),  # a certificate that does not verify: never retried
    (dict(status=0, curl_code=6), Action.FAIL),  # no such host
] + [(dict(status=s), Action.RETRY) for s in sorted(RETRY_STATUSES)])
def test_policy_says_what_an_answer_means(exchange, action):
    assert verdict(**exchange).action is action


def test_policy_bounds_every_kind_of_repetition():
    assert verdict(503, tries=POLICY.attempts).action is Action.FAIL
    assert "after 3 tries" in verdict(503, tries=POLICY.attempts).why
    location = {"location": "/elsewhere"}
    assert verdict(302, location, redirects=MAX_REDIRECTS).action is Action.FAIL
    assert verdict(401, CHALLENGE, reauthentications=MAX_REAUTHENTICATIONS).action is Action.FAIL
    assert verdict(403, elsewhere=True, resolutions=POLICY.attempts).action is Action.FAIL


def test_policy_honours_retry_after_up_to_four_times_the_longest_backoff():
    assert verdict(429, {"retry-after": "3"}).delay == 3.0
    in_a_while = email.utils.formatdate(time.time() + 3, usegmt=True)
    assert 1.5 < verdict(503, {"retry-after": in_a_while}).delay <= 3.0
    too_long = verdict(429, {"retry-after": "3600"})
    assert too_long.action is Action.FAIL and "3600 s" in too_long.why
    assert 0.05 <= verdict(503).delay <= 0.1  # the first backoff, jittered down to half


def test_retry_after_reads_seconds_and_dates_and_ignores_garbage():
    assert retry_after("7") == 7.0
    assert retry_after(None) == retry_after("") == retry_after("soon") == 0.0
    assert retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
