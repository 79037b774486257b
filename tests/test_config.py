"""Configuration: the plan's variables, strict parsing, one error for every bad variable."""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
import sqlalchemy as sa
from fleet import forked, held_by_another_thread

import resilient_db as rdb
from resilient_db import _config


def test_defaults_are_the_plans() -> None:
    cfg = rdb.load_config({})
    assert cfg.enabled is True
    assert (cfg.retry, cfg.max_retries, cfg.initial_delay) == (True, 3, 1.0)
    assert (cfg.circuit_breaker, cfg.failure_threshold, cfg.reset_timeout) == (True, 5, 30.0)
    assert cfg.status_validation is True
    assert cfg.response_validation is True
    assert (cfg.logging, cfg.log_level) == (True, "info")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("true", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("On", True),
        ("false", False),
        ("False", False),
        ("0", False),
        ("NO", False),
        (" off ", False),
    ],
)
def test_every_boolean_spelling(raw: str, expected: bool) -> None:
    assert rdb.load_config({"SELF_HEALING_ENABLED": raw}).enabled is expected


def test_times_are_milliseconds() -> None:
    cfg = rdb.load_config(
        {
            "SELF_HEALING_INITIAL_DELAY": "250",
            "SELF_HEALING_RESET_TIMEOUT": "1500",
            "SELF_HEALING_MAX_RETRIES": "7",
            "SELF_HEALING_LOG_LEVEL": "WARN",
        }
    )
    assert cfg.initial_delay == 0.25
    assert cfg.reset_timeout == 1.5
    assert cfg.max_retries == 7
    assert cfg.log_level == "warn"


def test_every_bad_variable_is_reported_at_once() -> None:
    env = {
        "SELF_HEALING_ENABLED": "maybe",
        "SELF_HEALING_MAX_RETRIES": "-1",
        "SELF_HEALING_INITIAL_DELAY": "fast",
        "SELF_HEALING_LOG_LEVEL": "loud",
        "SELF_HEALING_RETRIES": "3",
        "PATH": "/usr/bin",
    }
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config(env)
    err = info.value
    assert set(err.problems) == {
        "SELF_HEALING_ENABLED",
        "SELF_HEALING_MAX_RETRIES",
        "SELF_HEALING_INITIAL_DELAY",
        "SELF_HEALING_LOG_LEVEL",
        "SELF_HEALING_RETRIES",
    }
    text = str(err)
    for name, value in [
        ("SELF_HEALING_ENABLED", "'maybe'"),
        ("SELF_HEALING_MAX_RETRIES", "'-1'"),
        ("SELF_HEALING_INITIAL_DELAY", "'fast'"),
        ("SELF_HEALING_LOG_LEVEL", "'loud'"),
    ]:
        assert name in text
        assert value in text
    assert "did you mean SELF_HEALING_MAX_RETRIES" in text
    assert "5 invalid self-healing settings" in text
    assert isinstance(err, ValueError)
    assert isinstance(err, rdb.ResilientDBError)


def test_zero_threshold_is_rejected() -> None:
    with pytest.raises(rdb.ConfigError, match="SELF_HEALING_FAILURE_THRESHOLD"):
        rdb.load_config({"SELF_HEALING_FAILURE_THRESHOLD": "0"})


def test_config_in_code_is_validated_and_accepts_timedelta() -> None:
    cfg = rdb.Config(initial_delay=timedelta(milliseconds=20), reset_timeout=2)
    assert cfg.initial_delay == 0.02
    assert cfg.reset_timeout == 2.0
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(max_retries=-2, initial_delay=-1.0, log_level="chatty")
    assert set(info.value.problems) == {"max_retries", "initial_delay", "log_level"}


def test_as_env_round_trips() -> None:
    cfg = rdb.Config(initial_delay=0.05, max_retries=9, logging=False, bulk_update="raise")
    assert rdb.load_config(cfg.as_env()) == cfg
    # under half a millisecond is no 0 (a DEADLINE of 0 with retries on is refused)
    tiny = rdb.Config(deadline=0.0004, redis_timeout=0.001).as_env()
    assert tiny["SELF_HEALING_DEADLINE"] == "1"
    assert rdb.load_config(tiny).deadline == 0.001
    # a zero duration is 0 (not the least 1 ms), a switch is written as the variables' text
    zero = rdb.Config(conflict_delay=0, logging=False).as_env()
    assert (zero["SELF_HEALING_CONFLICT_DELAY"], zero["SELF_HEALING_LOGGING"]) == ("0", "false")
    assert zero["SELF_HEALING_ENABLED"] == "true"


@pytest.mark.parametrize("ratio", [1e-05, 2.5e-07, -0.0, 0.30000000000000004, 10.0])
def test_as_env_gives_a_retry_budget_the_environment_takes(ratio: float) -> None:
    """A ratio that Config takes was written as Python prints it (``1e-05``, ``-0.0``), which
    SELF_HEALING_RETRY_BUDGET refuses: check-config showed, and a process given the variables
    failed to start on, a value the configuration held."""
    cfg = rdb.Config(retry_budget=ratio)
    shown = cfg.as_env()["SELF_HEALING_RETRY_BUDGET"]
    assert shown.replace(".", "").isdigit()
    assert rdb.load_config(cfg.as_env()) == cfg
    assert str(cfg.retry_budget) != "-0.0"


def test_config_in_code_refuses_what_the_environment_would() -> None:
    """A timedelta(0) Redis timeout (the Redis link never connected with it) and anything
    under the environment's least, 1 ms; integers too large for a float are a ConfigError
    named by the field, not an OverflowError."""
    for timeout in (timedelta(0), 0, 1e-12):
        with pytest.raises(rdb.ConfigError, match=r"redis_timeout: must be at least 0\.001 s"):
            rdb.Config(redis_timeout=timeout)
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(
            initial_delay=10**400, redis_timeout=10**400, retry_budget=10**400, max_retries=10**400
        )
    problems = info.value.problems
    assert set(problems) == {"initial_delay", "redis_timeout", "retry_budget", "max_retries"}
    assert problems["max_retries"] == "too large: 401 digits; at most 1000"
    assert "too large" in problems["initial_delay"]


def test_numbers_in_code_that_are_no_number_are_named_and_minus_zero_is_zero() -> None:
    """A duration or the budget's ratio given in code that is no number (a string read from
    elsewhere, None, a bool) is a ConfigError naming its field, not a TypeError of the range
    checks after it; a duration of -0.0 is kept as 0.0 (as the retry budget's ratio is)."""
    for field in ("conflict_delay", "redis_timeout", "reset_timeout"):
        for value, shown in (("0.5", "'0.5'"), (None, "None"), (True, "True")):
            with pytest.raises(rdb.ConfigError) as info:
                rdb.Config(**{field: value})
            assert info.value.problems == {field: f"must be a number of seconds, got {shown}"}
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(log_level=5)  # type: ignore[arg-type]
    assert info.value.problems == {
        "log_level": "must be one of debug, info, warn, warning, error, got 5"
    }
    assert math.copysign(1.0, rdb.Config(conflict_delay=-0.0).conflict_delay) == 1.0
    for ratio, shown in (("0.2", "'0.2'"), (True, "True")):
        with pytest.raises(rdb.ConfigError) as info:
            rdb.Config(retry_budget=ratio)  # type: ignore[arg-type]
        assert info.value.problems == {
            "retry_budget": f"must be a ratio such as 0.2 or None, got {shown}"
        }


def test_a_duration_in_the_environment_says_it_is_milliseconds() -> None:
    """A duration's variable takes whole milliseconds, and its refusal says so (a count's says
    only "a whole number")."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_INITIAL_DELAY": "1.5", "SELF_HEALING_MAX_RETRIES": "1.5"})
    assert info.value.problems == {
        "SELF_HEALING_INITIAL_DELAY": (
            "'1.5' is invalid: not a whole number of milliseconds (digits 0-9 only)"
        ),
        "SELF_HEALING_MAX_RETRIES": "'1.5' is invalid: not a whole number (digits 0-9 only)",
    }


def test_config_in_code_reports_every_problem_at_once() -> None:
    """A setting with a problem of its own does not end the checks of the bounds: the ones
    after it are reported too."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(max_retries="x", redis_timeout=100)  # type: ignore[arg-type]
    assert set(info.value.problems) == {"max_retries", "redis_timeout"}
    assert "over the 10 s limit" in info.value.problems["redis_timeout"]


@pytest.mark.parametrize(
    ("field", "largest"), [("failure_threshold", 1_000_000), ("half_open_probes", 10_000)]
)
def test_the_largest_counts_are_taken_and_one_more_is_refused(field: str, largest: int) -> None:
    assert getattr(rdb.Config(**{field: largest}), field) == largest
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(**{field: largest + 1})
    assert info.value.problems == {field: f"too large: {largest + 1}; at most {largest}"}


def test_a_long_bad_value_is_shown_by_its_first_characters_and_its_length() -> None:
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_LOG_LEVEL": "x" * 50})
    assert info.value.problems["SELF_HEALING_LOG_LEVEL"].startswith(
        f"{'x' * 40!r}... (50 characters) is invalid: must be one of"
    )


def test_a_zero_deadline_is_refused_while_one_retry_is_left() -> None:
    """A deadline of 0 leaves no time for a retry: refused with one retry allowed, taken
    without retries (max_retries=0, or retry off)."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(deadline=0, max_retries=1)
    assert set(info.value.problems) == {"deadline"}
    assert "max_retries=1" in info.value.problems["deadline"]
    assert rdb.Config(deadline=0, max_retries=0).deadline == 0
    assert rdb.Config(deadline=0, retry=False).deadline == 0


def test_leading_zeros_are_no_size_and_a_negative_ratio_says_so() -> None:
    assert rdb.load_config({"SELF_HEALING_MAX_RETRIES": "0000000000000005"}).max_retries == 5
    assert rdb.load_config({"SELF_HEALING_INITIAL_DELAY": "0" * 30 + "250"}).initial_delay == 0.25
    with pytest.raises(rdb.ConfigError, match=r"'-0\.2' is invalid: must not be negative"):
        rdb.load_config({"SELF_HEALING_RETRY_BUDGET": "-0.2"})


def test_feature_switches_follow_the_master_switch() -> None:
    off = rdb.load_config({"SELF_HEALING_ENABLED": "off"})
    assert [off.retry_on, off.breaker_on, off.guard_on, off.logging_on] == [False] * 4
    on = rdb.load_config({"SELF_HEALING_RETRY": "no"})
    assert not on.retry_on
    assert on.breaker_on


def test_factory_reads_environment_when_created_and_config_overrides(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:1/db")
    monkeypatch.setenv("SELF_HEALING_MAX_RETRIES", "8")
    from_env = rdb.ResilientSession(engine, service="cfg-env")
    explicit = rdb.ResilientSession(engine, service="cfg-code", config=rdb.Config(max_retries=1))
    assert from_env.config.max_retries == 8
    assert explicit.config.max_retries == 1

    monkeypatch.setenv("SELF_HEALING_MAX_RETRIES", "2")
    assert from_env.config.max_retries == 8  # read at creation, not per call
    rdb.reload_config()
    assert from_env.config.max_retries == 2
    assert from_env.policy.config.max_retries == 2
    assert explicit.config.max_retries == 1  # explicit config= is never overridden

    monkeypatch.setenv("SELF_HEALING_MAX_RETRIES", "many")
    with pytest.raises(rdb.ConfigError, match="SELF_HEALING_MAX_RETRIES"):
        rdb.reload_config()
    assert from_env.config.max_retries == 2  # nothing half-applied
    monkeypatch.delenv("SELF_HEALING_MAX_RETRIES")
    rdb.reload_config()
    engine.dispose()


def test_bad_environment_fails_factory_creation(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:1/db")
    monkeypatch.setenv("SELF_HEALING_CIRCUIT_BREAKER", "enabled")
    monkeypatch.setenv("SELF_HEALING_RESET_TIMEOUT", "30s")
    with pytest.raises(rdb.ConfigError) as info:
        rdb.ResilientSession(engine)
    assert set(info.value.problems) == {
        "SELF_HEALING_CIRCUIT_BREAKER",
        "SELF_HEALING_RESET_TIMEOUT",
    }
    engine.dispose()


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("+5", "digits 0-9 only"),
        ("1_000", "digits 0-9 only"),
        ("\u0663", "digits 0-9 only"),  # ARABIC-INDIC DIGIT THREE
        ("1e3", "digits 0-9 only"),
        ("10" + "0" * 22, "too large"),
        ("9" * 401, "too large"),  # int() of 401+ digits raised OverflowError-like ValueError
    ],
)
def test_numbers_are_ascii_digits_within_bounds(value: str, why: str) -> None:
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_MAX_RETRIES": value, "SELF_HEALING_LOG_LEVEL": "loud"})
    problems = info.value.problems
    assert why in problems["SELF_HEALING_MAX_RETRIES"]
    assert "SELF_HEALING_LOG_LEVEL" in problems  # the other bad variable is not hidden
    assert len(str(info.value)) < 400  # a huge value is echoed as a short prefix only


def test_huge_delays_are_refused_before_they_overflow_the_clock() -> None:
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config(
            {"SELF_HEALING_INITIAL_DELAY": "9" * 15, "SELF_HEALING_MAX_DELAY": "9" * 15}
        )
    assert set(info.value.problems) == {"SELF_HEALING_INITIAL_DELAY", "SELF_HEALING_MAX_DELAY"}
    with pytest.raises(rdb.ConfigError, match="over the 3600 s limit"):
        rdb.Config(reset_timeout=10**12)


@pytest.mark.parametrize(
    ("given", "problem"),
    [
        (
            {"reset_timeout": 30000},
            "reset_timeout: 30000 s is over the 3600 s limit; Config takes seconds (the "
            "environment takes milliseconds): did you mean 30?",
        ),
        ({"deadline": 60000}, "deadline: 60000 s is over the 3600 s limit; Config takes seconds"),
        ({"max_delay": 30000.0}, "max_delay: 30000 s is over the 3600 s limit; Config"),
        ({"conflict_delay": 100}, "conflict_delay: 100 s is over the 5 s limit; Config"),
        # the environment's default, 20 ms, given as a number of seconds
        ({"conflict_delay": 20}, "conflict_delay: 20 s is over the 5 s limit; Config"),
        ({"redis_timeout": 100}, "redis_timeout: 100 s is over the 10 s limit; Config"),
        # under its own bound, but over the default cap of 30 s
        ({"initial_delay": 1000}, "more than max_delay (30 s): the first backoff would already"),
    ],
)
def test_milliseconds_given_to_config_are_refused_with_a_hint(
    given: dict[str, float], problem: str
) -> None:
    """Config takes seconds, the environment milliseconds: a number of milliseconds given to
    Config (reset_timeout=30000 for 30 s) is an error saying so, not a reset timeout of 8
    hours."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(**given)
    ((name, value),) = given.items()
    assert problem in str(info.value)
    assert info.value.problems[name].endswith(f"did you mean {value / 1000:g}?")


def test_duration_bounds_are_the_environments_and_small_values_pass() -> None:
    """Each duration's bound is the environment's in milliseconds; at the bound and near zero
    it is accepted; a timedelta or a number far past the bound gets no milliseconds hint."""
    bounds = {
        "initial_delay": 3600,
        "max_delay": 3600,
        "conflict_delay": 5,
        "deadline": 3600,
        "reset_timeout": 3600,
        "redis_timeout": 10,
    }
    for name, seconds in bounds.items():
        env = f"SELF_HEALING_{name.upper()}"
        cap = {"max_delay": 3600} if name == "initial_delay" else {}  # (the default is 30 s)
        cap_env = {"SELF_HEALING_MAX_DELAY": "3600000"} if cap else {}
        assert getattr(rdb.load_config({env: str(seconds * 1000), **cap_env}), name) == seconds
        assert getattr(rdb.Config(**{name: seconds}, **cap), name) == seconds
        in_env = rdb.Config(**{name: timedelta(seconds=seconds)}, **cap).as_env()
        assert in_env[env] == str(seconds * 1000)
        with pytest.raises(rdb.ConfigError) as info:
            rdb.load_config({env: str(seconds * 1000 + 1)})
        assert info.value.problems[env] == (
            f"'{seconds * 1000 + 1}' is invalid: too large; at most {seconds * 1000} ms"
        )
        for over in (timedelta(seconds=seconds * 1000), seconds * 1000 + 1):
            with pytest.raises(rdb.ConfigError) as info:
                rdb.Config(**{name: over})
            assert info.value.problems[name].endswith(f"s is over the {seconds} s limit")
    tiny = rdb.Config(initial_delay=0.0, max_delay=0.001, conflict_delay=0, reset_timeout=0.001)
    assert (tiny.initial_delay, tiny.conflict_delay, tiny.reset_timeout) == (0.0, 0.0, 0.001)
    with pytest.raises(rdb.ConfigError) as info:  # plainly seconds, wrong way round: no hint
        rdb.Config(initial_delay=10, max_delay=1)
    assert "did you mean" not in str(info.value)


def test_contradictory_settings_are_refused_together() -> None:
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_INITIAL_DELAY": "5000", "SELF_HEALING_MAX_DELAY": "1000"})
    assert "more than SELF_HEALING_MAX_DELAY" in info.value.problems["SELF_HEALING_INITIAL_DELAY"]
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_DEADLINE": "0"})
    assert "no time to retry" in info.value.problems["SELF_HEALING_DEADLINE"]
    # without retries a zero deadline is consistent, with self-healing switched off too (the
    # master switch was refused beside it, though nothing retries then)
    assert (
        rdb.load_config({"SELF_HEALING_DEADLINE": "0", "SELF_HEALING_RETRY": "false"}).deadline == 0
    )
    off = {"SELF_HEALING_DEADLINE": "0", "SELF_HEALING_ENABLED": "false"}
    assert rdb.load_config(off).deadline == 0
    assert rdb.Config(deadline=0, enabled=False).deadline == 0
    with pytest.raises(rdb.ConfigError, match="initial_delay"):
        rdb.Config(initial_delay=10, max_delay=1)


def test_check_config_reports_an_overlong_number_without_a_traceback(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from resilient_db._cli import main  # noqa: PLC0415

    monkeypatch.setenv("SELF_HEALING_MAX_RETRIES", "9" * 500)
    status = main(["check-config"])
    out, err = capsys.readouterr()
    assert status != 0
    assert "Traceback" not in out + err
    assert "SELF_HEALING_MAX_RETRIES" in out + err


def test_redis_url_and_retry_budget() -> None:
    cfg = rdb.load_config(
        {
            "SELF_HEALING_REDIS_URL": "redis://app:s3cret@127.0.0.1:6379/2",
            "SELF_HEALING_REDIS_TIMEOUT": "50",
            "SELF_HEALING_RETRY_BUDGET": "0.2",
            "SELF_HEALING_RETRY_BUDGET_FLOOR": "5",
        }
    )
    assert cfg.redis_url == "redis://app:s3cret@127.0.0.1:6379/2"
    assert (cfg.redis_timeout, cfg.retry_budget, cfg.retry_budget_floor) == (0.05, 0.2, 5)
    assert "s3cret" not in repr(cfg)
    assert rdb.load_config(cfg.as_env()) == cfg
    unset = rdb.load_config({})
    assert (unset.redis_url, unset.retry_budget) == (None, None)
    assert "SELF_HEALING_REDIS_URL" not in unset.as_env()


@pytest.mark.parametrize(
    ("name", "raw", "reason"),
    [
        ("SELF_HEALING_REDIS_URL", "http://u:s3cret@host/0", "scheme http: is not one of"),
        ("SELF_HEALING_REDIS_URL", "redis://:s3cret@host/zero", "is not a number"),
        ("SELF_HEALING_REDIS_URL", "redis://:s3cret@:6379/0", "has no host"),
        ("SELF_HEALING_REDIS_URL", "", "is empty; unset the variable to run without Redis"),
        ("SELF_HEALING_RETRY_BUDGET", "20%", "not a ratio"),
        ("SELF_HEALING_RETRY_BUDGET", "-0.2", "must not be negative"),
        ("SELF_HEALING_RETRY_BUDGET", "11", "too large; at most 10"),
        ("SELF_HEALING_RETRY_BUDGET", "-1", "must not be negative"),
        ("SELF_HEALING_RETRY_BUDGET", "nan", "not a ratio"),
        ("SELF_HEALING_RETRY_BUDGET", "inf", "not a ratio"),
        ("SELF_HEALING_RETRY_BUDGET", "", "not a ratio"),
        ("SELF_HEALING_RETRY_BUDGET", "1e-1", "not a ratio"),
        ("SELF_HEALING_RETRY_BUDGET_FLOOR", "1001", "too large; at most 1000"),
        ("SELF_HEALING_REDIS_TIMEOUT", "0", "must be at least 1"),
        ("SELF_HEALING_REDIS_TIMEOUT", "10001", "too large"),
    ],
)
def test_bad_redis_and_budget_settings_are_named_and_secrets_masked(
    name: str, raw: str, reason: str
) -> None:
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({name: raw})
    text = str(info.value)
    assert name in text
    assert reason in text
    assert "s3cret" not in text


@pytest.mark.parametrize(
    ("raw", "ratio"), [("0", 0.0), ("1", 1.0), ("5", 5.0), ("0.2 ", 0.2), (".5", 0.5), ("10", 10.0)]
)
def test_retry_budget_ratios_taken(raw: str, ratio: float) -> None:
    """0 is a budget of the floor alone (unset is none); spaces at the ends are the shell's."""
    assert rdb.load_config({"SELF_HEALING_RETRY_BUDGET": raw}).retry_budget == ratio


def test_redis_url_in_code_is_checked_and_masked() -> None:
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(redis_url="redis://:s3cret@", retry_budget=-1)
    text = str(info.value)
    assert "redis_url" in text
    assert "retry_budget" in text
    assert "s3cret" not in text


def test_as_env_masked_hides_the_redis_password() -> None:
    cfg = rdb.Config(redis_url="redis://app:s3cret@127.0.0.1:6379/0")
    assert cfg.as_env()["SELF_HEALING_REDIS_URL"] == "redis://app:s3cret@127.0.0.1:6379/0"
    shown = cfg.as_env(masked=True)
    assert shown["SELF_HEALING_REDIS_URL"] == "redis://app:***@127.0.0.1:6379/0"


def test_factories_refuse_a_config_or_classifier_of_another_type() -> None:
    """A dict where a Config belongs (or anything else) is named, before the factory exists
    (before: an AttributeError from deep inside)."""
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/db")  # never connected
    with pytest.raises(TypeError, match=r"^config must be a resilient_db\.Config .* got dict$"):
        rdb.ResilientSession(engine, config={"max_retries": 3})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"^classifier must be a resilient_db\.Classifier, got"):
        rdb.ResilientSession(engine, classifier=lambda exc: None)  # type: ignore[arg-type]


def test_contradictions_are_reported_with_other_problems_and_named_by_what_was_set() -> None:
    """A contradiction showed only once every other variable was fixed, and was named after a
    variable the user had not set (only MAX_DELAY set: the error said INITIAL_DELAY)."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config(
            {
                "SELF_HEALING_MAX_RETRIES": "x",
                "SELF_HEALING_INITIAL_DELAY": "5000",
                "SELF_HEALING_MAX_DELAY": "1000",
            }
        )
    assert set(info.value.problems) == {"SELF_HEALING_MAX_RETRIES", "SELF_HEALING_INITIAL_DELAY"}
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_MAX_DELAY": "500"})
    assert set(info.value.problems) == {"SELF_HEALING_MAX_DELAY"}
    assert "SELF_HEALING_INITIAL_DELAY (1 s) is more than SELF_HEALING_MAX_DELAY (0.5 s)" in str(
        info.value
    )
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_MAX_RETRIES": "2", "SELF_HEALING_DEADLINE": "oops"})
    assert set(info.value.problems) == {"SELF_HEALING_DEADLINE"}  # no contradiction on top
    with pytest.raises(rdb.ConfigError) as info:  # in code: every field named at once
        rdb.Config(max_retries=-1, initial_delay=10, max_delay=1)
    assert set(info.value.problems) == {"max_retries", "initial_delay"}


def test_an_environment_of_other_types_or_lower_case_names_is_a_config_error() -> None:
    """``load_config`` given a mapping with non-string values or names raised AttributeError;
    a name in lower case was silently ignored (environment names are case-sensitive). Each is
    reported with the bad variables after it, not in place of them."""
    for env, name, why in [
        ({"SELF_HEALING_MAX_RETRIES": 5}, "SELF_HEALING_MAX_RETRIES", "values are strings"),
        ({"SELF_HEALING_REDIS_URL": None}, "SELF_HEALING_REDIS_URL", "got NoneType"),
        ({1: "x"}, "1", "names are strings"),
        (
            {"self_healing_enabled": "false"},
            "self_healing_enabled",
            "names are upper case: SELF_HEALING_ENABLED",
        ),
        ({"Self_Healing_Retrys": "1"}, "Self_Healing_Retrys", "did you mean SELF_HEALING_RETRY"),
    ]:
        with pytest.raises(rdb.ConfigError) as info:
            rdb.load_config({**env, "SELF_HEALING_LOG_LEVEL": "loud"})  # type: ignore[dict-item]
        assert set(info.value.problems) == {name, "SELF_HEALING_LOG_LEVEL"}
        assert why in info.value.problems[name]


def test_every_documented_log_level_is_taken() -> None:
    """The README's levels for ``SELF_HEALING_LOG_LEVEL``, ``warning`` beside ``warn``: each
    one taken from the environment (any case) and in code, none refused."""
    for level in ("debug", "info", "warn", "warning", "error"):
        assert rdb.load_config({"SELF_HEALING_LOG_LEVEL": level.upper()}).log_level == level
        assert rdb.Config(log_level=level).log_level == level


def test_choices_in_code_take_any_case_as_the_environment_does() -> None:
    cfg = rdb.Config(log_level="INFO", bulk_update="Raise")
    assert (cfg.log_level, cfg.bulk_update) == ("info", "raise")
    assert cfg == rdb.load_config(
        {"SELF_HEALING_LOG_LEVEL": "INFO", "SELF_HEALING_BULK_UPDATE": "Raise"}
    )


def test_concurrent_reloads_leave_every_factory_on_the_last_configuration() -> None:
    """Two reloads at once (a SIGHUP handler and an admin endpoint): each applied its
    configuration to the factories after letting go of the lock, so factories could end up on
    the other one than ``with_self_healing`` uses."""
    import sys  # noqa: PLC0415

    from resilient_db._state import STATE  # noqa: PLC0415

    engines = [sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/none") for _ in range(4)]
    factories = [rdb.ResilientSession(e, service=f"reload-{i}") for i, e in enumerate(engines)]
    envs = ({"SELF_HEALING_MAX_RETRIES": "1"}, {"SELF_HEALING_MAX_RETRIES": "2"})
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        for _ in range(150):
            threads = [threading.Thread(target=rdb.reload_config, args=(env,)) for env in envs]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert STATE.env_config is not None
            assert [f.config for f in factories] == [STATE.env_config] * len(factories)
    finally:
        sys.setswitchinterval(interval)
        rdb.reload_config()
        for engine in engines:
            engine.dispose()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_during_a_reload_in_another_thread_can_reload() -> None:
    """The reload lock, held by a thread of the parent when it forked, is renewed in the child:
    its reload_config() does not wait for a reload that never ends there."""
    with held_by_another_thread(_config._RELOADING):  # as a reload_config() running there

        def child() -> bool:
            return rdb.reload_config({"SELF_HEALING_MAX_RETRIES": "7"}).max_retries == 7

        with forked(child) as proc:
            assert proc.result(timeout=30) is True, "the child hung on the reload lock"


def test_a_reset_timeout_of_zero_is_refused() -> None:
    """An opening that ends at once rejects nothing: the breaker let every call through and
    logged an opening and a half-open state per failure."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_RESET_TIMEOUT": "0"})
    assert info.value.problems["SELF_HEALING_RESET_TIMEOUT"] == "'0' is invalid: must be at least 1"
    for zero in (0, 0.0, timedelta(0), 0.0005):
        with pytest.raises(rdb.ConfigError) as info:
            rdb.Config(reset_timeout=zero)
        assert "must be at least 0.001 s" in info.value.problems["reset_timeout"]
        assert "circuit_breaker=False" in info.value.problems["reset_timeout"]
    assert rdb.load_config({"SELF_HEALING_RESET_TIMEOUT": "1"}).reset_timeout == 0.001


@pytest.mark.parametrize(
    "secret",
    [
        "redis://:hunter2@cache.internal:6379/0",
        "postgresql://app:hunter2@db.internal/app",
        " redis://app:hunter2@cache.internal:6379/0 ",
    ],
)
def test_a_url_set_in_the_wrong_setting_is_shown_masked(secret: str) -> None:
    """``SELF_HEALING_REDIS_URL`` and ``SELF_HEALING_REDIS_TIMEOUT`` swapped: the URL, password
    and all, was quoted as the timeout's bad value (and by ``Config(log_level=...)``)."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_REDIS_TIMEOUT": secret, "SELF_HEALING_LOG_LEVEL": secret})
    text = str(info.value)
    assert "hunter2" not in text
    assert "***@" in info.value.problems["SELF_HEALING_REDIS_TIMEOUT"]
    for name in ("log_level", "bulk_update"):
        with pytest.raises(rdb.ConfigError) as info:
            rdb.Config(**{name: secret})
        assert "hunter2" not in str(info.value)
        assert "***@" in info.value.problems[name]
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(retry=secret)  # type: ignore[arg-type]
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    "secret",
    ["redis://:hunter2@cache.internal:6379/0", "postgresql://app:hunter2@db.internal/app"],
)
def test_a_url_set_as_the_markers_owner_is_refused_masked(
    secret: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``SELF_HEALING_MARKERS_OWNER``, the one setting of free text, took a URL set there by
    mistake for a role name: ``resilient-db check-config`` printed it, password and all, as did
    ``repr(Config)`` and ``as_env(masked=True)``, and its SQL sent it to the server. A URL is
    no role name anyone made: refused, shown masked, as in every other setting."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_MARKERS_OWNER": secret})
    assert "hunter2" not in str(info.value)
    assert "***@" in info.value.problems["SELF_HEALING_MARKERS_OWNER"]
    assert "URL" in info.value.problems["SELF_HEALING_MARKERS_OWNER"]
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(markers_owner=secret)
    assert "hunter2" not in str(info.value)
    assert "URL" in info.value.problems["markers_owner"]
    # a role name with a colon or a slash, quoted as PostgreSQL takes it, is still a role name
    assert rdb.Config(markers_owner="team/migrations:v2").markers_owner == "team/migrations:v2"


def test_a_retry_budget_alone_needs_the_redis_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the breaker off, the retry budget is what talks to Redis: without the package it
    is refused while a unit may retry (one retry is enough), and taken when nothing retries
    or no budget is set."""
    monkeypatch.setitem(sys.modules, "redis", None)  # what a missing package gives import
    base = {
        "SELF_HEALING_REDIS_URL": "redis://127.0.0.1:6379/0",
        "SELF_HEALING_CIRCUIT_BREAKER": "false",
    }
    budget = {"SELF_HEALING_RETRY_BUDGET": "0.2"}
    for retries in ({}, {"SELF_HEALING_MAX_RETRIES": "1"}):
        with pytest.raises(rdb.ConfigError, match="redis package is not installed"):
            rdb.load_config({**base, **budget, **retries})
    for unused in (
        {**budget, "SELF_HEALING_RETRY": "false"},
        {**budget, "SELF_HEALING_MAX_RETRIES": "0"},
        {**budget, "SELF_HEALING_ENABLED": "false"},
        {},  # no budget
    ):
        assert rdb.load_config({**base, **unused}).redis_url is not None


def test_a_reload_refused_for_a_missing_redis_package_changes_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without the redis package, a reload turning Redis on raised only once the first factory
    had taken the new settings: that factory ran without retries, the next on the old
    settings, and ``with_self_healing`` failed on every call (the process-wide settings were
    the new, unusable ones). Refused before anything is applied now, as ``check-config`` and a
    new factory refuse it."""
    from resilient_db._state import STATE  # noqa: PLC0415

    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/none")
    for name in [n for n in os.environ if n.startswith("SELF_HEALING_")]:
        monkeypatch.delenv(name)
    rdb.reload_config()
    factories = [rdb.ResilientSession(engine, service=f"no-redis-{i}") for i in range(2)]
    before = STATE.env_config
    decorated = rdb.with_self_healing(service="no-redis-op")(lambda: 42)
    assert decorated() == 42
    monkeypatch.setitem(sys.modules, "redis", None)  # what a missing package gives import
    monkeypatch.setenv("SELF_HEALING_RETRY", "false")
    monkeypatch.setenv("SELF_HEALING_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        with pytest.raises(rdb.ConfigError, match="redis package is not installed"):
            rdb.reload_config()
        with pytest.raises(rdb.ConfigError, match="redis package is not installed"):
            rdb.load_config()  # what check-config says too
        with pytest.raises(rdb.ConfigError) as info:  # with the other problems, at once
            rdb.load_config({**os.environ, "SELF_HEALING_MAX_RETRIES": "abc"})
        assert set(info.value.problems) >= {"SELF_HEALING_REDIS_URL", "SELF_HEALING_MAX_RETRIES"}
        assert STATE.env_config is before
        assert [f.config for f in factories] == [before, before]
        assert all(f.policy.retry_on for f in factories)
        assert decorated() == 42
        # nothing would talk to Redis: valid without the package, and applied
        monkeypatch.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")
        assert rdb.reload_config().redis_url is not None
        assert [f.policy.retry_on for f in factories] == [False, False]
    finally:
        for name in (
            "SELF_HEALING_RETRY",
            "SELF_HEALING_REDIS_URL",
            "SELF_HEALING_CIRCUIT_BREAKER",
        ):
            monkeypatch.delenv(name)
        rdb.reload_config()
        engine.dispose()


def test_a_factory_made_after_a_reload_given_a_mapping_takes_what_it_applied() -> None:
    """reload_config(mapping) configures the factories made without config=: one made next,
    on the same engine too, takes the same settings, not os.environ's (a kill switch set by
    the reload switches it off as well, and it is not refused for disagreeing)."""
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/none")
    first = rdb.ResilientSession(engine, service="reload-mapping-1")
    try:
        rdb.reload_config({"SELF_HEALING_ENABLED": "false", "SELF_HEALING_MAX_RETRIES": "7"})
        second = rdb.ResilientSession(engine, service="reload-mapping-2")
        elsewhere = rdb.ResilientSession(
            sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/none"), service="reload-mapping-3"
        )
        assert [f.config.enabled for f in (first, second, elsewhere)] == [False] * 3
        assert elsewhere.config.max_retries == 7
        # a reload reading os.environ again: factories made after it read it too
        rdb.reload_config()
        assert rdb.ResilientSession(engine, service="reload-mapping-4").config == rdb.load_config()
    finally:
        rdb.reload_config()
        engine.dispose()


def _markers_installed(engine: sa.Engine) -> None:
    rdb.install_commit_markers(engine)


def _problem_answered(engine: sa.Engine) -> None:
    from resilient_db.web import problem_details  # noqa: PLC0415 - the web extra's module

    blocked = rdb.IllegalTransitionError(
        model="Task", pk=1, column="status", from_state="done", to_state="new", via="flush"
    )
    assert problem_details(blocked) is not None


@pytest.mark.usefixtures("no_backoff")
@pytest.mark.parametrize("first", [_markers_installed, _problem_answered])
def test_with_self_healing_reads_the_environment_at_its_first_call(
    engine: sa.Engine,
    service: str,
    clean_env: pytest.MonkeyPatch,
    first: Callable[[sa.Engine], None],
) -> None:
    """The environment's configuration that ``with_self_healing`` keeps was filled by whatever
    looked at it first (the markers' install at start-up, a web handler's answer): a kill
    switch set after that was missed by the operations' first call, which retried, while a
    factory made at the same moment took it."""
    clean_env.setenv("SELF_HEALING_CIRCUIT_BREAKER", "false")  # (the failures open none)
    clean_env.setattr(_config.STATE, "env_config", None)  # nothing read it yet in the process
    first(engine)  # at start-up, before the environment is complete
    clean_env.setenv("SELF_HEALING_RETRY", "false")
    calls = 0

    def operation() -> None:
        nonlocal calls
        calls += 1
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT raise_code('57P03')"))  # the server takes no connections

    with pytest.raises(sa.exc.OperationalError):
        rdb.with_self_healing(operation, service=service)
    assert calls == 1  # not retried: SELF_HEALING_RETRY=false read at this first call
    assert rdb.ResilientSession(engine, service=service).config.retry is False
    # read once: set later, a variable reaches the operations through reload_config()
    clean_env.delenv("SELF_HEALING_RETRY")
    with pytest.raises(sa.exc.OperationalError):
        rdb.with_self_healing(operation, service=service)
    assert calls == 2
    rdb.reload_config()
    with pytest.raises(sa.exc.OperationalError):
        rdb.with_self_healing(operation, service=service)
    assert calls == 2 + 1 + rdb.load_config().max_retries


@pytest.mark.parametrize("name", ["failure_threshold", "half_open_probes"])
@pytest.mark.parametrize("given", [0, -2, 0.5, "3"])
def test_a_count_that_must_be_at_least_one_says_so_whatever_was_given(
    name: str, given: object
) -> None:
    """``failure_threshold`` and ``half_open_probes`` count from 1: a fraction, a negative or
    a string is told the bound that holds (it said "a whole number >= 0" for those, which 0
    is not), and 0 the same."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.Config(**{name: given})  # type: ignore[arg-type]
    assert info.value.problems[name] == f"must be a whole number >= 1, got {given!r}"


@pytest.mark.parametrize(
    "variable", ["SELF_HEALING_FAILURE_THRESHOLD", "SELF_HEALING_HALF_OPEN_PROBES"]
)
@pytest.mark.parametrize("given", ["0", "-1"])
def test_a_variable_counted_from_one_gives_its_bound_for_zero_and_negatives(
    variable: str, given: str
) -> None:
    """From the environment alike: 0 and a negative count are told the bound (a negative one
    was told only "must not be negative", which 0 satisfies)."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({variable: given})
    assert info.value.problems[variable] == f"{given!r} is invalid: must be at least 1"


def test_config_names_the_setting_meant_by_an_unknown_keyword() -> None:
    """``Config(max_retry=5)`` (the variable is SELF_HEALING_MAX_RETRIES) said only Python's
    "unexpected keyword argument"; the factories' keywords and the environment name the one
    meant, and so do ``Config`` and ``replace``."""
    with pytest.raises(
        TypeError,
        match=r"^Config got max_retry=, which is no setting; did you mean max_retries=\?$",
    ):
        rdb.Config(max_retry=5)  # type: ignore[call-arg]
    with pytest.raises(
        TypeError,
        match=r"^Config got resetTimeout=, which is no setting; did you mean reset_timeout=\?$",
    ):
        rdb.Config().replace(resetTimeout=1)
    with pytest.raises(TypeError, match=r"^Config got zzz=, which is no setting$"):
        rdb.load_config().replace(zzz=1)
    assert rdb.Config(max_retries=5).replace(deadline=2).max_retries == 5  # the rest unchanged
