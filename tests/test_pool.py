"""ReplicaSets, routes and their configuration, in-process: which replica an attempt gets, how
health ejects and readmits replicas, what a stage ends with when its attempts run out.

No upstream is called here: the pools are given a clock of the test's own, and the
attempts are resolved by hand, as the relay resolves them (tests/test_failover.py runs
the same against real fake upstreams under gunicorn).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from stageserver.config import ConfigError, UpstreamConfig, apply_defaults, upstream_configs
from stageserver.errors import (
    AllAttemptsFailed,
    ConnectTimeout,
    FirstTokenTimeout,
    InvalidRequest,
    NoReplicaAvailable,
    StageFailure,
    StageInterrupted,
    UpstreamErrorObject,
    UpstreamProtocolError,
    UpstreamStatusError,
    UpstreamUnavailable,
    outcome_of,
)
from stageserver.retry_after import retry_after_seconds
from stageserver.upstream.clients import UpstreamRegistry
from stageserver.upstream.replicas import (
    Replica,
    ReplicaAttempt,
    ReplicaEvents,
    without_credentials,
)
from stageserver.upstream.route import ReplicaSets, Route

A, B, C = "http://10.0.0.1:8000/v1", "http://10.0.0.2:8000/v1", "http://10.0.0.3:8000/v1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Events(ReplicaEvents):
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.in_flight = 0

    def on_lease(self, replica: Replica) -> None:
        self.in_flight += 1

    def on_outcome(self, replica: Replica, outcome: str, seconds: float) -> None:
        self.calls.append(("outcome", replica.url, outcome))

    def on_ejected(self, replica: Replica) -> None:
        self.calls.append(("ejected", replica.url, ""))

    def on_release(self, replica: Replica) -> None:
        self.in_flight -= 1


def configs(upstreams: dict[str, Any], **settings: Any) -> list[UpstreamConfig]:
    config: dict[str, Any] = {"STAGESERVER_UPSTREAMS": upstreams, **settings}
    apply_defaults(config, {})
    return upstream_configs(config)


def pools(upstreams: dict[str, Any]) -> tuple[ReplicaSets, Clock, Events]:
    clock, events = Clock(), Events()
    made = ReplicaSets(UpstreamRegistry(configs(upstreams)), events, clock)
    for pool in made:
        pool._rng = random.Random(7)
    return made, clock, events


def until(replica: Replica) -> float | None:
    """When its cool-down ends (None: admitted); a call, so that mypy does not narrow it."""
    return replica.ejected_until


def attempt(route: Route) -> ReplicaAttempt:
    got = route.next_attempt()
    assert got is not None
    return got


def failure(outcome: str, retry_after: float | None = None) -> BaseException:
    """The failure that ends an attempt with ``outcome``, as the relay would get it."""
    if outcome.startswith("http_"):
        status = int(outcome.removeprefix("http_"))
        return UpstreamStatusError(f"answered HTTP {status}", status, retry_after)
    return {
        "refused": UpstreamUnavailable("could not reach"),
        "connect_timeout": ConnectTimeout("no connection"),
        "reset": UpstreamProtocolError("dropped", dropped=True),
        "protocol_error": UpstreamProtocolError("not JSON"),
        "error_object": UpstreamErrorObject("an error chunk"),
        "first_token_timeout": FirstTokenTimeout("no first token"),
        "cancelled": StageInterrupted("cancelled"),
    }[outcome]


def report(got: ReplicaAttempt, outcome: str, retry_after: float | None = None) -> None:
    if outcome == "ok":
        got.served_first_chunk()
    else:
        got.failed(failure(outcome, retry_after))


def fail(pools_: ReplicaSets, name: str, outcome: str = "refused") -> ReplicaAttempt:
    """One stage whose only attempt fails so, released at once."""
    got = attempt(pools_.route(name))
    report(got, outcome)
    got.release()
    return got


# -- passive health -----------------------------------------------------------------------


def test_failures_in_a_row_eject_a_replica_for_a_growing_cool_down() -> None:
    made, clock, events = pools({"one": {"urls": [A], "eject_after": 2}, "ok": {"url": B}})
    replica = made["one"].replicas[0]
    fail(made, "one")
    assert until(replica) is None  # one failure is not two in a row
    fail(made, "one")
    assert until(replica) == clock.now + 5
    assert events.calls[-1] == ("ejected", A, "")

    for cool_down in (10, 20, 40, 80, 160, 300, 300):  # each failed trial doubles it
        clock.now = until(replica) or 0.0
        trial = attempt(made.route("one"))
        assert trial.trial and replica.trial
        report(trial, "http_502")
        trial.release()
        assert until(replica) == clock.now + cool_down
    assert sum(c[0] == "ejected" for c in events.calls) == 8
    assert events.in_flight == 0


def test_a_half_open_replica_gets_exactly_one_trial_and_success_readmits_it() -> None:
    made, clock, _ = pools({"pair": {"urls": [A, B], "eject_after": 1}})
    first = attempt(made.route("pair"))
    a = first.replica
    report(first, "reset")
    first.release()
    assert until(a) == clock.now + 5

    for _ in range(10):  # cooling down: never chosen while B is there
        other = attempt(made.route("pair"))
        assert other.replica is not a
        other.release()
    clock.now += 5
    made["pair"]._last = a
    trial = attempt(made.route("pair"))
    assert trial.replica is a and trial.trial
    for _ in range(10):  # its one trial is out: the others go to B
        assert attempt(made.route("pair")).replica is not a
    report(trial, "ok")
    trial.release()
    assert (until(a), a.ejections, a.failures, a.trial) == (None, 0, 0, False)


def test_answers_that_are_the_callers_fault_keep_a_replica_in() -> None:
    made, _, _ = pools({"one": {"url": A, "eject_after": 2}})
    replica = made["one"].replicas[0]
    for outcome in ("refused", "http_400", "first_token_timeout", "error_object", "http_503"):
        fail(made, "one", outcome)
    assert until(replica) is None  # never two failures in a row
    fail(made, "one", "http_500")
    assert until(replica) is not None


def test_a_cancelled_trial_lets_the_next_stage_try() -> None:
    made, clock, _ = pools({"one": {"url": A, "eject_after": 1}})
    replica = made["one"].replicas[0]
    fail(made, "one")
    clock.now += 5
    trial = attempt(made.route("one"))
    report(trial, "cancelled")
    trial.release()
    assert not replica.trial and until(replica) is not None
    assert attempt(made.route("one")).trial


def test_the_probe_readmits_or_ejects() -> None:
    made, clock, events = pools({"one": {"url": A}})
    pool = made["one"]
    replica = pool.replicas[0]
    pool.probed(replica, False)
    assert until(replica) == clock.now + 5
    pool.probed(replica, False)  # cooling down already: not longer
    assert until(replica) == clock.now + 5
    pool.probed(replica, True)
    assert until(replica) is None
    assert [c[0] for c in events.calls] == ["ejected"]


# -- balancing, holds, limits -------------------------------------------------------------


def test_light_traffic_reuses_the_replica_used_last() -> None:
    made, _, _ = pools({"trio": {"urls": [A, B, C]}})
    first = attempt(made.route("trio"))
    first.release()
    for _ in range(20):
        again = attempt(made.route("trio"))
        assert again.replica is first.replica
        again.release()


def test_load_goes_to_the_replica_with_fewer_stages_in_flight() -> None:
    made, _, events = pools({"pair": {"urls": [A, B]}})
    held = [attempt(made.route("pair")) for _ in range(40)]
    counts = [r.in_flight for r in made["pair"].replicas]
    assert abs(counts[0] - counts[1]) <= 1, counts
    for lease in held:
        lease.release()
        lease.release()  # a second release changes nothing
    assert [r.in_flight for r in made["pair"].replicas] == [0, 0]
    assert events.in_flight == 0


def test_retry_after_holds_the_replica_until_then() -> None:
    made, clock, _ = pools({"pair": {"urls": [A, B]}})
    first = attempt(made.route("pair"))
    report(first, "http_429", retry_after=2)
    first.release()
    held = first.replica
    assert held.ejected_until is None  # busy is not down
    for _ in range(10):
        other = attempt(made.route("pair"))
        assert other.replica is not held
        other.release()
    clock.now += 2
    made["pair"]._last = held
    assert attempt(made.route("pair")).replica is held

    fail_long = attempt(made.route("pair"))
    report(fail_long, "http_503", retry_after=86400)
    assert fail_long.replica.held_until == clock.now + 300  # at most 300 s


def test_max_in_flight_and_then_no_replica_at_all() -> None:
    made, _, _ = pools({"one": {"url": A, "max_in_flight": 2}})
    leases = [attempt(made.route("one")) for _ in range(2)]
    route = made.route("one")
    assert route.next_attempt() is None
    failure = route.give_up(None)
    assert isinstance(failure, NoReplicaAvailable) and failure.http_status == 503
    assert str(failure) == (
        f"no replica can take the stage now: 'one' at {A} runs 2 stages, its max_in_flight; "
        "retry shortly"
    )
    leases[0].release()
    assert made.route("one").next_attempt() is not None


def test_all_ejected_still_tries_the_one_whose_cool_down_ends_first() -> None:
    made, clock, _ = pools({"pair": {"urls": [A, B], "eject_after": 1}})
    a, b = made["pair"].replicas
    made["pair"].probed(a, False)
    clock.now += 1
    made["pair"].probed(b, False)
    route = made.route("pair")
    last_resort = attempt(route)
    assert last_resort.replica is a and not last_resort.trial
    report(last_resort, "refused")
    assert route.next_attempt() is None  # only a first attempt gets a last resort
    assert until(a) == 1005.0  # a failure while ejected changes nothing


# -- routes -------------------------------------------------------------------------------


def test_a_route_tries_each_replica_once_then_the_fallbacks_in_order() -> None:
    made, _, _ = pools(
        {
            "gpu": {"urls": [A, B], "retries": 5, "fallbacks": ["spare", "hosted"]},
            "spare": {"url": C, "fallbacks": ["hosted"]},
            "hosted": {"url": "https://api.example.com/v1"},
        }
    )
    route = made.route("gpu")
    seen = []
    while (got := route.next_attempt()) is not None:
        seen.append((got.name, got.number))
        report(got, "refused")
    assert seen == [("gpu", 1), ("gpu", 2), ("spare", 3), ("hosted", 4)]


def test_retries_count_the_attempts_after_the_first() -> None:
    made, _, _ = pools({"trio": {"urls": [A, B, C], "retries": 1}})
    route = made.route("trio")
    assert attempt(route).number == 1 and attempt(route).number == 2
    assert route.next_attempt() is None


def test_each_attempt_gets_its_timeout_but_never_past_the_budget() -> None:
    made, clock, _ = pools(
        {
            "gpu": {"urls": [A, B], "first_token_timeout": 10, "attempt_timeout": 4,
                    "fallbacks": ["hosted"]},
            "hosted": {"url": C, "first_token_timeout": 30},
        }
    )  # fmt: skip
    route = made.route("gpu")
    first = attempt(route)
    assert (first.timeout, first.budget_bound) == (4, False)
    clock.now += 4
    second = attempt(route)
    assert (second.timeout, second.budget_bound) == (4, False)
    clock.now += 4
    third = attempt(route)  # the fallback's own 30 s, cut to what the budget has left
    assert (third.name, third.timeout, third.budget_bound) == ("hosted", 2, True)
    clock.now += 2
    assert route.next_attempt() is None


def test_what_a_stage_ends_with_when_its_attempts_run_out() -> None:
    made, _, _ = pools({"gpu": {"urls": [A, B], "fallbacks": ["hosted"]}, "hosted": {"url": C}})
    route = made.route("gpu")
    one = attempt(route)
    refused = UpstreamUnavailable("could not reach")
    one.failed(refused)
    assert route.give_up(refused) is refused  # one attempt: its own failure, as before pools
    two = attempt(route)
    status = UpstreamStatusError("upstream 'gpu' answered HTTP 500: boom", 500)
    two.failed(status)
    three = attempt(route)
    timeout = FirstTokenTimeout(route.first_token_message())
    three.failed(timeout)
    failure = route.give_up(timeout)
    assert isinstance(failure, AllAttemptsFailed) and failure.http_status == 504
    assert str(failure) == (
        "upstream 'gpu' sent no first token within 120 s, over 3 attempts ("
        f"'gpu' at {one.url}: refused; 'gpu' at {two.url}: http_500; 'hosted' at {C}: "
        "first_token_timeout)"
    )
    exhausted = route.give_up(status)
    assert str(exhausted).startswith("upstream 'gpu': all 3 attempts failed before the first")
    assert str(exhausted).endswith("; the last: upstream 'gpu' answered HTTP 500: boom")
    assert exhausted.http_status == 502


@pytest.mark.parametrize(
    ("outcome", "again"),
    [
        ("refused", True), ("connect_timeout", True), ("reset", True), ("http_500", True),
        ("http_503", True), ("http_429", True), ("first_token_timeout", True),
        ("http_400", False), ("http_404", False), ("protocol_error", False),
        ("error_object", False), ("cancelled", False),
    ],
)  # fmt: skip
def test_which_outcomes_fail_over(outcome: str, again: bool) -> None:
    ended = failure(outcome)
    assert outcome_of(ended) == outcome  # each failure names its own outcome
    worth = isinstance(ended, StageFailure) and ended.worth_another_replica
    assert worth is again


# -- resolving a request ------------------------------------------------------------------


def registry() -> UpstreamRegistry:
    return UpstreamRegistry(
        configs(
            {
                "gpu": {"urls": [A, B], "models": ["llama"], "fallbacks": ["hosted"]},
                "hosted": {"url": C, "models": ["gpt-4o-mini", "gpt-4o"]},
                "other": {"url": "http://10.0.0.9/v1", "models": ["llama"]},
            }
        )
    )


def test_a_model_selects_the_first_upstream_that_lists_it() -> None:
    upstreams = registry()
    assert upstreams.resolve(None, None, model="gpt-4o").name == "hosted"
    assert upstreams.resolve(None, None, model="llama").name == "gpu"
    assert upstreams.resolve(None, None, model="unlisted").name == "gpu"  # the default
    allowed = frozenset({"hosted", "other"})
    assert upstreams.resolve(None, None, allowed, model="llama").name == "other"
    assert upstreams.resolve(None, None, frozenset({"hosted"}), "llama").name == "hosted"
    assert upstreams.resolve("hosted", None, model="llama").name == "hosted"  # named wins


def test_base_url_may_name_any_replica_of_an_upstream() -> None:
    upstreams = registry()
    assert upstreams.resolve(None, B + "/").name == "gpu"
    assert upstreams.resolve("gpu", B).name == "gpu"
    with pytest.raises(InvalidRequest, match="base_url does not match upstream 'hosted'"):
        upstreams.resolve("hosted", A)


def test_a_fallback_is_sent_a_model_it_serves() -> None:
    upstreams = registry()
    assert upstreams.config("hosted").model_for("llama") == "gpt-4o-mini"
    assert upstreams.config("hosted").model_for("gpt-4o") == "gpt-4o"
    assert upstreams.config("gpu").model_for("llama") == "llama"
    assert upstreams.route("gpu") == ["gpu", "hosted"]


def test_replica_urls_without_credentials() -> None:
    assert without_credentials("https://user:secret@host:8443/v1") == "https://host:8443/v1"
    assert without_credentials(A) == A


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("7", 7.0),
        ("", None),
        (None, None),
        ("soon", None),
        ("\u00b2", None),  # a digit to str.isdigit, not to float
        ("Wed, 21 Oct 2015 07:28:00 GMT", 0.0),
    ],
)
def test_retry_after_is_seconds_or_a_date(header: str | None, seconds: float | None) -> None:
    assert retry_after_seconds(header) == seconds


# -- configuration --------------------------------------------------------------------------


def test_pool_fields_and_their_defaults() -> None:
    gpu, hosted = configs(
        {
            "gpu": {"urls": [A, B + "/"], "models": ["llama"], "retries": 0,
                    "fallbacks": ["hosted"], "max_in_flight": 8, "attempt_timeout": 3,
                    "eject_after": 5},
            "hosted": {"url": C},
        },
        STAGESERVER_FIRST_TOKEN_TIMEOUT=50,
    )  # fmt: skip
    assert (gpu.url, gpu.urls, gpu.models, gpu.fallbacks) == (A, (A, B), ("llama",), ("hosted",))
    assert (gpu.retries, gpu.max_in_flight, gpu.attempt_timeout, gpu.eject_after) == (0, 8, 3, 5)
    assert (hosted.urls, hosted.retries, hosted.max_in_flight) == ((C,), 2, None)
    assert (hosted.attempt_timeout, hosted.eject_after) == (50, 3)


@pytest.mark.parametrize(
    ("upstreams", "message"),
    [
        ({"a": {"url": A, "urls": [B]}}, "upstream 'a': give url .* or urls .*, not both"),
        ({"a": {"urls": []}}, "upstream 'a': urls must be a non-empty list of URLs"),
        ({"a": {"urls": [A, "ftp://x"]}}, "upstream 'a': urls: entry 'ftp://x' must be an abs"),
        ({"a": {"urls": [A, A + "/"]}}, f"upstream 'a': urls lists '{A}' twice"),
        ({"a": {"url": A, "models": "llama"}}, "upstream 'a': models must be a list of model"),
        ({"a": {"url": A, "models": ["x", ""]}}, "upstream 'a': models must be a list of"),
        ({"a": {"url": A, "retries": -1}}, "upstream 'a': retries must be a whole number from 0"),
        ({"a": {"url": A, "retries": True}}, "upstream 'a': retries must be a whole number"),
        ({"a": {"url": A, "max_in_flight": 0}}, "upstream 'a': max_in_flight must be a whole"),
        ({"a": {"url": A, "eject_after": 1.5}}, "upstream 'a': eject_after must be a whole"),
        ({"a": {"url": A, "attempt_timeout": 0}}, "upstream 'a': attempt_timeout must be a pos"),
        (
            {"a": {"url": A, "attempt_timeout": 9, "first_token_timeout": 5}},
            r"upstream 'a': attempt_timeout \(9 s\) must not exceed first_token_timeout \(5 s\)",
        ),
        ({"a": {"url": A, "fallbacks": "b"}}, "upstream 'a': fallbacks must be a list of up"),
        (
            {"a": {"url": A, "fallbacks": ["b"]}},
            "upstream 'a': fallbacks: unknown upstream 'b'; configured: a",
        ),
        ({"a": {"url": A, "fallbacks": ["a"]}}, "upstream 'a': fallbacks: a cycle, a -> a"),
        (
            {"a": {"url": A, "fallbacks": ["b"]}, "b": {"url": B, "fallbacks": ["c"]},
             "c": {"url": C, "fallbacks": ["b"]}},
            "upstream 'a': fallbacks: a cycle, b -> c -> b",
        ),
    ],
)  # fmt: skip
def test_malformed_pool_fields_fail_at_start_up(upstreams: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        configs(upstreams)
