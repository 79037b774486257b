"""``SELF_HEALING_REDIS_URL``: its password is never shown, whatever characters it holds (in a
``ConfigError``, ``check-config``, log records, reprs, ``health()``); a URL the redis client
would refuse is refused with the configuration, not at the first unit; and a link whose client
cannot be built leaves its breakers and budgets on local state instead of raising."""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fleet import shared
from processes import wait_for

import resilient_db as rdb
from resilient_db._cli import main
from resilient_db._config import client_problem, mask_url
from resilient_db._fleet import links
from resilient_db.testing import RedisServer, free_port

#: the two halves of every password below: neither may be shown anywhere
LEFT, RIGHT = "Sx3cr", "3tq"
#: what may sit between them: the characters a URL gives a meaning to, encoded or not
INNER = ("/", "?", "#", "[", "]", "@", ":", "&", " ", "%2F", "%23%40")
PORT = free_port()  # nothing listens there: a link made for a URL stays down, and says so


def _shapes() -> Iterator[tuple[str, str]]:
    for inner in INNER:
        password = f"{LEFT}{inner}{RIGHT}"
        yield f"password only, {inner!r}", f"redis://:{password}@127.0.0.1:{PORT}/0"
        yield f"user and password, {inner!r}", f"redis://app:{password}@127.0.0.1:{PORT}/0"
        if inner != ":":  # "user:password" is what the URL says: LEFT would be a user name
            yield f"user name alone, {inner!r}", f"redis://{password}@127.0.0.1:{PORT}/0"
        yield f"query, {inner!r}", f"redis://127.0.0.1:{PORT}/0?password={password}"
        yield f"unix socket, {inner!r}", f"unix://:{password}@/nonexistent/redis.sock"
    password = f"{LEFT}/{RIGHT}"
    yield "the port's place", f"redis://user:6379?{password}@127.0.0.1/0"
    yield "refused by the client", f"redis://:{password}@127.0.0.1:{PORT}/0?db=x"
    yield "no scheme at all", f"{LEFT}{RIGHT}"
    yield "another scheme", f"http://:{password}@127.0.0.1/"
    yield "bad port", f"redis://:{password}@127.0.0.1:99999/0"
    # (the client decodes the query's keys: this is its password)
    yield "query, key encoded", f"redis://127.0.0.1:{PORT}/0?pass%77ord={LEFT}{RIGHT}"


SHAPES = dict(_shapes())


@pytest.mark.parametrize("url", SHAPES.values(), ids=SHAPES.keys())
def test_a_redis_password_is_never_shown(
    url: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="resilient_db")
    shown: list[str] = [mask_url(url)]
    try:
        config: rdb.Config | None = rdb.load_config({"SELF_HEALING_REDIS_URL": url})
    except rdb.ConfigError as exc:
        config = None
        shown += [str(exc), repr(exc), repr(exc.problems)]
    try:
        rdb.Config(redis_url=url)
    except rdb.ConfigError as exc:
        shown += [str(exc), repr(exc.problems)]
    clean_env.setenv("SELF_HEALING_REDIS_URL", url)
    for args in (["check-config"], ["check-config", "--json"]):
        status = main(args)
        out, err = capsys.readouterr()
        assert status == (0 if config is not None else 2), out + err
        shown += [out, err]
    if config is not None:  # accepted: made into a link that cannot reach its Redis
        engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/db")  # never connected
        rdb.ResilientSession(engine, service="secret", config=config.replace(retry_budget=0.2))
        wait_for(lambda: "Shared state unavailable" in caplog.text, "the link's warning")
        shown += [repr(config), str(rdb.health()), *map(repr, links().values()), *links()]
        shown += [thread.name for thread in threading.enumerate()]
    shown += [repr(record.__dict__) for record in caplog.records]
    for text in shown:
        assert LEFT not in text
        assert RIGHT not in text


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("redis://:Pa/ss@10.0.0.1:6379/0", "redis://***@10.0.0.1:6379/0"),
        ("redis://user:6379?pw@10.0.0.1/0", "redis://user:***@10.0.0.1/0"),
        ("redis://app:pw@10.0.0.1:6379/2", "redis://app:***@10.0.0.1:6379/2"),
        ("redis://pw@10.0.0.1:6379/0", "redis://***@10.0.0.1:6379/0"),  # Redis: a password
        ("redis://pw:@10.0.0.1:6379/0", "redis://***@10.0.0.1:6379/0"),
        ("redis://a+b:pw@10.0.0.1/0", "redis://***@10.0.0.1/0"),  # not plainly a user name
        ("redis://10.0.0.1/0?password=p@w&db=1#x", "redis://10.0.0.1/0?password=***&db=1"),
        ("redis://10.0.0.1/0?ssl_password=pw", "redis://10.0.0.1/0?ssl_password=***"),
        ("redis://10.0.0.1/0?password=p&w", "redis://10.0.0.1/0?password=***&***"),
        # a key's letters percent-encoded: the client decodes the key, and takes the password
        ("redis://10.0.0.1/0?pass%77ord=pw", "redis://10.0.0.1/0?pass%77ord=***"),
        ("redis://10.0.0.1/0?%50ASSWORD=pw&db=1", "redis://10.0.0.1/0?%50ASSWORD=***&db=1"),
        ("unix://:pw@/run/redis.sock?db=1", "unix://***@/run/redis.sock?db=1"),
        ("redis://10.0.0.1:6379/0#pw", "redis://10.0.0.1:6379/0"),
        ("redis://:p/w", "redis://***"),  # no @host: the host part is the password's
        ("redis://[::1]:6379/0", "redis://[::1]:6379/0"),
        ("pw", "<not a URL>"),
        ("://pw@10.0.0.1", "<not a URL>"),
    ],
)
def test_mask_url_reads_the_raw_text(url: str, masked: str) -> None:
    assert mask_url(url) == masked


ENCODE = "percent-encode / ? # @ [ ] in a password (/ is %2F, ? %3F, # %23, @ %40"


def _brackets_refused() -> bool:
    """Whether this Python's urllib (and so the redis client) refuses brackets around what is
    no IPv6 address in a password: 3.11.4+ and 3.12+ do; 3.10 takes them, and the URL works."""
    try:
        urllib.parse.urlsplit(f"redis://:{LEFT}[{RIGHT}]@10.0.0.1:6379/0")
    except ValueError:
        return True
    return False


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        (
            f"redis://:{LEFT}/{RIGHT}@10.0.0.1:6379/0",
            "an @ follows a / ? or # (one of those in a password ends the host part early, and "
            f"the host would be read from the password); {ENCODE}",
        ),
        pytest.param(
            f"redis://:{LEFT}[{RIGHT}]@10.0.0.1:6379/0",
            f"the host is not valid (an IPv6 address is written [::1]); {ENCODE}",
            marks=pytest.mark.skipif(
                not _brackets_refused(), reason="this Python's urllib takes [ ] in a password"
            ),
        ),
        (f"redis://:{LEFT}]{RIGHT}@10.0.0.1:6379/0", "the host is not valid"),
        (f"redis://:{LEFT}/{RIGHT}", f"the port is not a number from 1 to 65535; {ENCODE}"),
        ("redis://10.0.0.1:99999/0", "the port is not a number from 1 to 65535"),
        ("redis://10.0.0.1:0/0", "the port is not a number from 1 to 65535"),
        ("redis://10.0.0.1/zero", "the database (the path after the host) is not a number"),
        ("unix://", "unix:// needs a socket path, e.g. unix:///run/redis.sock"),
        ("REDIS://10.0.0.1/0", "scheme REDIS: is not one of redis://, rediss://, unix:// (in"),
        (LEFT, "is invalid (not shown: it may be a secret in the wrong variable): not a URL"),
        # a byte of another encoding (os.environ's lone surrogate) in the password: taken, and
        # every connect failed encoding it (AUTH)
        (
            f"redis://:{LEFT}\udcff{RIGHT}@10.0.0.1:6379/0",
            "it holds a character that is no UTF-8 text (a byte of another encoding?)",
        ),
    ],
)
def test_url_problems_are_fixed_texts(url: str, reason: str) -> None:
    """Never a URL parser's message: it quotes what it failed on (part of the password)."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_REDIS_URL": url})
    text = info.value.problems["SELF_HEALING_REDIS_URL"]
    assert reason in text
    assert LEFT not in text
    assert RIGHT not in text


def test_a_unix_socket_url_is_taken_without_a_host() -> None:
    """``unix://`` names a socket path, not a host: no host or database number is asked of
    it (the checks of a TCP URL would refuse every socket URL)."""
    for url in ("unix:///run/redis.sock", "unix:///run/redis.sock?db=2"):
        assert rdb.load_config({"SELF_HEALING_REDIS_URL": url}).redis_url == url


def test_what_the_client_quotes_of_a_credential_is_taken_out() -> None:
    """redis-py quotes some values it refuses (``ssl_cert_reqs``); a message quoting any part
    of the URL's credentials or ``password=`` values has it replaced."""
    url = f"redis://app:{LEFT}%2F{RIGHT}@h/0?password={RIGHT}+{LEFT}&ssl_password={LEFT}x"
    for quoted in (f"{LEFT}/{RIGHT}", f"{LEFT}%2F{RIGHT}", f"{RIGHT} {LEFT}", f"{LEFT}x"):
        text = client_problem(ValueError(f"bad flag: {quoted}!"), url)
        assert text == "the redis client does not accept it (ValueError: bad flag: ***!)"


def test_what_the_client_quotes_is_masked_as_the_url_is() -> None:
    """A user name the masked URL shows stays in the client's words (the short one ``u`` would
    be masked in every word), one it hides is masked there too; a secret that holds a shorter
    one is masked whole, not left with its tail; a long message is cut."""
    said = "invalid username-password pair"
    assert client_problem(ValueError(said), "redis://u:pw@h/0") == (
        f"the redis client does not accept it (ValueError: {said})"
    )
    assert client_problem(ValueError("no user a+b"), "redis://a+b:pw@h/0") == (
        "the redis client does not accept it (ValueError: no user ***)"
    )
    assert client_problem(ValueError("bad abcdef"), "redis://:ab@h/0?password=abcdef") == (
        "the redis client does not accept it (ValueError: bad ***)"
    )
    long = client_problem(ValueError("x" * 300), "redis://h/0")
    assert long == f"the redis client does not accept it (ValueError: {'x' * 200}...)"


@pytest.mark.parametrize("raw", ["", "  "])
def test_an_empty_redis_url_is_an_error_that_says_how_to_go_without(raw: str) -> None:
    """Docker Compose's ``SELF_HEALING_REDIS_URL=``: refused (a process silently out of the
    fleet is worse), saying what to do instead."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_REDIS_URL": raw})
    assert info.value.problems == {
        "SELF_HEALING_REDIS_URL": "is empty; unset the variable to run without Redis"
    }
    with pytest.raises(rdb.ConfigError, match="redis_url: is empty; give None to run without"):
        rdb.Config(redis_url="")


# -- URLs the redis client refuses ---------------------------------------------------------------
REFUSED_BY_THE_CLIENT = {
    "?db=x": "Invalid value for 'db' in connection URL",
    "?health_check_interval=zz": "Invalid value for 'health_check_interval'",
    "?foo=1": "unexpected keyword argument 'foo'",
    "?protocol=9": "protocol must be either 2 or 3",
    "?max_connections=-1": "max_connections",
}


@pytest.mark.parametrize(("query", "said"), REFUSED_BY_THE_CLIENT.items())
def test_a_url_the_client_refuses_is_refused_with_the_configuration(
    query: str, said: str, clean_env: pytest.MonkeyPatch
) -> None:
    url = f"redis://:s3cret@127.0.0.1:{PORT}/0{query}"
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_REDIS_URL": url})
    text = info.value.problems["SELF_HEALING_REDIS_URL"]
    assert text.startswith(f"'redis://***@127.0.0.1:{PORT}/0{query}' is invalid: ")
    assert "the redis client does not accept it" in text
    assert said in text
    assert "s3cret" not in text
    with pytest.raises(rdb.ConfigError):
        rdb.Config(redis_url=url)
    # a factory reading this environment: a ConfigError, never the client's ValueError from
    # deep inside (nor a factory whose link fails later)
    clean_env.setenv("SELF_HEALING_REDIS_URL", url)
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/db")  # never connected
    with pytest.raises(rdb.ConfigError, match="the redis client does not accept it"):
        rdb.ResilientSession(engine, service="refused")


@pytest.mark.parametrize(
    "query",
    ["?socket_timeout=5", "?socket_connect_timeout=abc", "?retry_on_timeout=true", "?retry=x"],
)
def test_a_url_cannot_override_the_timeout_or_add_client_retries(query: str) -> None:
    """The client lets a URL's values win over the ones resilient_db gives it: a unit could
    wait on a hung Redis for the URL's timeout, or twice, instead of SELF_HEALING_REDIS_TIMEOUT."""
    with pytest.raises(rdb.ConfigError) as info:
        rdb.load_config({"SELF_HEALING_REDIS_URL": f"redis://127.0.0.1:{PORT}/0{query}"})
    text = info.value.problems["SELF_HEALING_REDIS_URL"]
    assert "which resilient_db sets itself" in text
    assert "remove it from the URL" in text


def test_a_link_whose_client_cannot_be_built_runs_on_local_state(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A URL the client refuses that got past the configuration (the check runs the same parse,
    so it is set here behind the validation's back, as a configuration made before a client
    upgrade could have it): factories and units work on local state, one warning says why."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    config = rdb.Config(redis_url=f"redis://:s3cret@127.0.0.1:{PORT}/0", retry_budget=0.2)
    object.__setattr__(config, "redis_url", f"redis://:s3cret@127.0.0.1:{PORT}/0?db=x")
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/db")  # never connected
    Session = rdb.ResilientSession(engine, service="refused", config=config)
    assert rdb.with_self_healing(lambda: 42, service="refused", config=config) == 42
    breaker = Session.policy.breaker
    assert breaker is not None
    breaker.open()  # this process's own breaker
    with pytest.raises(rdb.CircuitOpenError):
        rdb.with_self_healing(lambda: 42, service="refused", config=config)
    entry = rdb.health()["services"]["refused"]
    assert entry["breaker"]["shared"] == {
        "redis": f"redis://***@127.0.0.1:{PORT}/0?db=x",
        "connected": False,
        "problem": "the redis client does not accept it (ValueError: Invalid value for 'db' in "
        "connection URL.)",
        "fleet_opens": 0,
        "opened_here": 0,
        "opens_followed": 0,
        "fleet_timelines": {},
    }
    assert entry["budget"]["scope"] == "process"
    (warning,) = [r for r in caplog.records if "Shared state unavailable" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage() == (
        f"[SELF-HEAL] Shared state unavailable: Redis at redis://***@127.0.0.1:{PORT}/0?db=x "
        "(services: refused) cannot be used (the redis client does not accept it (ValueError: "
        "Invalid value for 'db' in connection URL.)); circuit breakers and retry budgets run on "
        "this process's own state"
    )
    assert "s3cret" not in repr([r.__dict__ for r in caplog.records])
    (link,) = links().values()
    assert not link.up
    assert not any(t.name.startswith("resilient_db-redis") for t in threading.enumerate())


def test_health_says_why_a_shared_breaker_is_not_connected(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A link that is down said why only in a warning (once a minute at most): ``health()``
    showed ``connected: False`` and nothing more. Its ``problem`` now says it, password
    masked, and is None again once Redis answers; a retry budget running on this process's
    state for want of its Redis says which Redis and why, too."""
    caplog.set_level(logging.INFO, logger="resilient_db")
    engine = sa.create_engine("postgresql+psycopg://u@127.0.0.1:9/db")  # never connected
    with RedisServer(password=f"{LEFT}{RIGHT}") as redis:
        wrong = f"redis://:{RIGHT}{LEFT}@127.0.0.1:{redis.port}/0"
        Wrong = rdb.ResilientSession(  # noqa: F841 - held: its budget stays configured
            engine, service="wrong", config=rdb.Config(redis_url=wrong, retry_budget=0.2)
        )
        Session = rdb.ResilientSession(  # noqa: F841 - held: its breaker stays shared
            engine, service="right", config=rdb.Config(redis_url=redis.url)
        )
        wait_for(lambda: shared("right")["connected"], "the link")
        assert shared("right")["problem"] is None
        wait_for(lambda: shared("wrong")["problem"] is not None, "the wrong password's problem")
        # Redis answered: it refused the login (said so, not "did not answer")
        login = "login refused (wrong password or user) (AuthenticationError: "
        assert shared("wrong")["problem"].startswith(login)
        assert "answered: login refused" in caplog.text
        assert "password" in shared("wrong")["problem"]
        assert not shared("wrong")["connected"]
        budget = rdb.health()["services"]["wrong"]["budget"]  # the budget says the same
        assert (budget["scope"], budget["problem"]) == ("process", shared("wrong")["problem"])
        assert budget["redis"] == shared("wrong")["redis"]

        redis.kill()
        wait_for(lambda: not shared("right")["connected"], "the link to go down")
        problem = shared("right")["problem"]
        assert problem.startswith("ConnectionError: "), problem
        redis.start()
        wait_for(lambda: shared("right")["connected"], "the link to come back")
        assert shared("right")["problem"] is None
        shown = [str(rdb.health()), *(repr(r.__dict__) for r in caplog.records)]
    for text in shown:
        assert LEFT not in text
        assert RIGHT not in text
