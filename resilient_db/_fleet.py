"""Breakers and retry budgets shared by every process through Redis (``SELF_HEALING_REDIS_URL``).

What is shared, per service name: the breaker's state, its failure count, the time it opened
until, the half-open probe reservations, and the retry budget's first attempts and retries.
Every update is one Lua script run atomically by Redis (``register_script``: EVALSHA, loaded
again by the client after a Redis restart). Nothing is read, modified and written back from
Python.

Why not pybreaker's ``CircuitRedisStorage`` (read in pybreaker 1.4): every read of ``state`` is
a GET, so the success path of every unit would wait for Redis; ``increment_counter`` and the
``counter`` read that decides to open are two commands, so two processes can both see the
threshold and both open (each notifying its listeners), or neither; the state is set with a plain
SET, so a half-open written by one process can overwrite an open written by another; there is no
probe reservation at all (every process lets its own probe through, N probes for N processes);
and ``opened_at`` has one-second resolution. So the state lives here, in scripts.

The success path talks to nobody: a process keeps a local view of each shared breaker, updated by
the answers of its own failure-path scripts and by a pub/sub message that every state change
publishes (one process opening makes the others fail fast as soon as the message arrives, a
millisecond or so on one host). A subscription silent for :data:`SUBSCRIPTION_CHECK_INTERVAL`
is checked by subscribing again on its connection: one dropped without a reset (a NAT or a
load balancer forgetting an idle flow) raises nothing, so without an answer the link goes
down and subscribes anew, reading the shared state. The first attempts the retry budget
counts are read from the process's counters and added to Redis about once a second by a
background thread, only when there are new ones; retries are spent against Redis on the
failure path only.

Redis down, slow or flushed never raises into a unit and never holds it past ``redis_timeout``
(100 ms by default; every command has it as its socket timeout, and the client's own retries are
off): the first failed command marks the link down, the breakers and budgets continue on this
process's own state (kept in step with the fleet's while the link was up, so the fallback starts
from what the fleet knew), one ``[SELF-HEAL]`` warning naming the Redis (its password masked)
and the services of this process using it (``(services: billing, orders)``) is logged when
the link goes down and once per :data:`DOWN_LOG_PERIOD` while it stays down (a new down
period after a logged "restored" warns at once), and the background thread tries again once a
second (one connection attempt, or a check of the subscription and one small writing script
while the subscription survived).
Once Redis
answers and takes that write, the process reports what Redis missed (half-open probes that
ended meanwhile, admits whose answer was lost), shares an opening it made on its own meanwhile
(unless the shared breaker is open, or changed since), reads the shared state again (writing
back the fleet's opening its view holds if Redis lost it, see below) and follows it, and logs
"restored" if it logged this down period's warning. The link is up only once the subscription
is confirmed and that write
(a check of every command the scripts run, and a PUBLISH on the channel) went through: an ACL
refusing one of them keeps it down, its warning naming what was refused. A command that
timed out may run all the same: a Redis that hung runs what it received when it resumes. So
what is sent again is idempotent: every half-open admit carries a reservation id drawn before
sending, and a probe's end (or the release of an admit whose answer
was lost) names it; Redis applies each reservation's end once, and only in the half-open state
it was made in, and an admit arriving after its release takes no slot. A retry budget's first
attempts whose script may have run are not sent again (counting too few is the safe side); those
refused before sending (the link down, the connection refused) are. A Redis that
answers but refuses writes (a read-only replica after a failover, out of memory, an ACL
without the rights) stays down: its scripts would fail at once; its warning, and
``problem``, say what it answered ("read-only replica, writes refused"), not that it did not
answer.

A Redis that lost the shared state (restarted without persistence, flushed, or another, empty
Redis behind the same address) has no breaker hash: its ``gen`` is 0 again. Followed as it
is, it would be a closed breaker: every process would close its open breaker and send units to
a database that is still down until the fleet counted the failure threshold again, and the
half-open probe reservations held would be gone. So every breaker script of the failure path
(a failure, a probe's admit and end) and the read on rejoining carry the caller's view of the
fleet's opening (``Breaker.lost_view``: open with the seconds it has left, or half-open once
they ran out; nothing when the view is closed or this process moved past it alone), and a
script finding ``gen`` 0 writes that view back before it does anything else (``restore_view``):
atomically, so the first process to meet the empty Redis writes it and the others find it
there and follow. It is the same opening, not a new one: its end is the one the view had (no
fresh reset timeout), its ``opens`` the count the view had seen (not one more), and no process
counts it in ``breaker_opens`` or logs an opening for it (a process whose view was closed, just
started say, follows it as another process's); the writer logs "Circuit breaker state
restored". Written back half-open, every probe slot is free: the probes running at the loss
end as usual (Redis finds their reservations nowhere: they count nowhere, and free nothing),
and at most the configured number are admitted fleet-wide from then on. A flush while the
links stay up is told to no link: the background thread of every process whose view holds an
opening with time left reads it back once a second (:data:`VIEW_CHECK_INTERVAL`; nothing
while no view does), so the first check after the flush writes it back, and a process started
meanwhile (its view closed: it read the empty Redis) follows it within about a second instead
of sending its units to the database until the opening's end; a failure-path script meeting
the empty Redis first writes it back as well. A restart takes the links down, and the first to
rejoin writes it back.

A view may be stale: a subscription dropped without a reset brings no message (another
process's ``close()``, a new opening) for the seconds its check takes to notice. Written back
into an empty Redis, a stale opening would reject every process's calls until its end. So the
background check takes the state it reads (a stale view follows the fleet's within about a
second, whatever the subscription does), and writes a view back only after the subscription
answered a check sent once the read had found Redis empty: pub/sub delivers in order, so every
change published before that answer was taken, and the view is the fleet's last state. A
subscription that does not answer takes the link down, and the view, doubted, is not written
back on rejoining. A failure-path script, and the read on rejoining, carry the view only while
Redis confirmed it (an answer, a message) within :data:`VIEW_FRESH` (on rejoining, before the
link went down). An opening written into a Redis that has no state for the breaker (written
back, shared on rejoining, made by a failure or an ``open()``) counts on from the openings the
caller had seen, not from 0. The retry budgets start
over: the first attempts of the window are gone (the ratio grants nothing until new ones are
counted) and the floor's tokens are full, at most one second's worth.

Async units call the same synchronous scripts: they run only on the failure path (after a
database error, before a backoff of tens of milliseconds at least), in a worker thread while the
state is shared (``Policy.afailed`` and its siblings in ``_retry``): a Redis that answers slowly
holds the failing unit, not the event loop, and a hung one at most ``redis_timeout`` per command,
after which the link is down and no unit calls it until the background thread has seen it
healthy again. ``redis.asyncio`` would need a second client, connection pool and script set per
event loop for the same few failure-path commands.

The background thread is a daemon, stops on ``reset_state()`` and at interpreter exit, and is
fork-safe: a child process (gunicorn forks its workers after import) gets new locks, a new client
and its own thread, and starts on its local state until it has synced with Redis. The first
attempts its parent had not yet added to the fleet's budgets stay the parent's to send.

A link connects in the background: in a process just started (or forked) it is not up for the
first ~10 ms. The success path does not wait for it (a unit admitted then meets this process's
fresh closed breaker), but the failure path does: a failure to count or a retry to pay for,
while the thread's first attempt to reach Redis has not ended, waits for it (at most
``redis_timeout``, once for all callers; see :meth:`FleetLink.wait_first_attempt`; an async
unit in a worker thread, as for its scripts: ``FleetLink.connecting``) and is then
decided by the fleet, or alone when Redis did not answer. Deciding alone at once, every worker
of a restart storm during an outage would count its failures from zero past the fleet's open
breaker and spend a floor of retries of its own.

One opening of a shared breaker counts once across the fleet: in ``breaker_opens`` of the process
that made it (its failure, its probe's, its ``open()``); every other process follows it (logs
it, rejects calls) and counts it in the breaker's ``shared.opens_followed``.

A link lives while a breaker or a budget is attached to it: one that ``reload_config()`` (or a
factory's new settings) moved to another Redis, or off Redis, detaches, and the last one to go
closes the link, so nothing keeps talking to (and warning about) a Redis no longer configured.
Breakers and budgets live per service, process-wide, and only a factory re-applies its
configuration to them: after a reload, :func:`follow_users` takes every one no live user
shares through its Redis any more (its factories are gone, or the reload switched it off) off
the link, whatever other factories exist. A new ``SELF_HEALING_REDIS_TIMEOUT`` restarts the
link's client and thread: every socket of a client has the timeout it was made with. A URL the
client refuses when the link builds it (the configuration checks the same parse, so only a URL
that got past it) leaves the link down for good, with one warning: the breakers and budgets
run on this process's own state. ``problem`` says why a link is down (``health()`` shows it).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final, NamedTuple, Protocol, TypeVar

from ._classify import failure_detail, log_quietly
from ._config import Config, client_problem, client_says, mask_url
from ._errors import ConfigError
from ._observability import (
    MAX_VALUE_CHARS,
    FleetTimelineHealth,
    LineLimit,
    emit,
    emit_line,
    log_breaker,
    more_since,
    truncated,
)
from ._state import STATE, renew_after_fork

__all__ = ["FleetDown", "FleetLink", "attach", "detach", "follow_users", "links"]

PREFIX = "resilient_db"
#: the pub/sub channel every breaker state change is published on, per Redis database number:
#: pub/sub ignores the database, and the keys of another database are other breakers
CHANNEL = PREFIX + ":breakers:{db}"
#: at most one "Redis unavailable" warning per link in this many seconds within one down period
#: (a new down period after a logged "restored" warns at once)
DOWN_LOG_PERIOD = 60.0
#: seconds between attempts to reach a Redis that is down (one connection attempt or one
#: writing script each)
RECONNECT_INTERVAL = 1.0
#: seconds between flushes of new first attempts to the fleet's budget (only when there are some)
FLUSH_INTERVAL = 1.0
#: the lines of a breaker listener that failed (``FleetLink._listener_failed``), per service:
#: one at most every 10 s, as those of the machinery failing in units (an application's
#: listener that raises does so at every state change the fleet shares)
_LISTENER_LINES = LineLimit()
renew_after_fork(globals(), "_LISTENER_LINES", LineLimit)
#: how long the background thread waits for a pub/sub message before looking at its other work
_TICK = 0.2
#: seconds of silence on the subscription after which the background thread checks it (it
#: subscribes again; see SUBSCRIPTION_ANSWER_MIN). A connection that a NAT, a firewall or a
#: load balancer dropped without a reset (an idle flow forgotten, a partition) reads
#: nothing and raises nothing: without the check the link would stay up while no other
#: process's change reached this one, for good
SUBSCRIPTION_CHECK_INTERVAL = 5.0
#: the least time the check's answer is given: no unit waits for it, and a Redis that stalls
#: for a moment (a fork for a snapshot) while nothing fails is no outage to warn about
SUBSCRIPTION_ANSWER_MIN = 1.0
#: seconds between the background thread's checks, while the link is up and this process's
#: view holds the fleet's opening of a shared breaker with time left, that Redis still holds
#: it: one breaker script (a read) per check and such breaker; none while no view holds an
#: opening with time left (closed, or the opening over: nothing is sent for
#: good while a service is idle). A Redis flushed with the links up gets the opening back
#: within about this long, so a process started after the flush, whose view never saw the
#: opening, follows it instead of sending units to the database (see
#: ``FleetLink._check_views``)
VIEW_CHECK_INTERVAL = 1.0
#: a view of the fleet's opening that Redis has not confirmed (a script's answer, a message of
#: the breaker) within this many seconds is not written back by a failure-path script, nor on
#: rejoining (counted to the moment the link went down): the fleet may have moved past it
#: (closed it, opened it anew) while this process heard nothing, its subscription dropped
#: without a reset. The background check confirms the view of an opening with time left
#: about once a second; it writes back only after its subscription has answered (see
#: ``FleetLink._check_views``)
VIEW_FRESH = 3.0
#: a half-open probe reservation not reported back within max(reset timeout, this) is forgotten
#: (its process died): the slot is given to another probe
PROBE_LEASE_MIN = 10.0
#: failures counted while closed expire this long after the last one (at least the reset timeout)
FAILURE_MEMORY_MIN = 10.0
#: seconds after a counted failure within which the failure of an attempt that began before it
#: is the same event seen again, not counted: a failover or a restart cuts off the units in
#: flight within milliseconds of each other. Failures arriving later count, whenever their
#: attempts began: a database that hangs (a blackholed address, connects waiting for their
#: timeout) fails attempts one timeout after each began, and those must add up within a few
#: of these windows, not one per timeout (see ``Breaker.on_failure``)
FAILOVER_WINDOW = 1.0

#: the hash of the highest timeline each PostgreSQL cluster (field: its system identifier)
#: was seen on as a primary by a process of the fleet, shared so that every process refuses an
#: old primary back as a primary after a failover that only another process saw (see
#: ``CommitProtocol._fence``): value ``"<timeline> <Redis time, µs> <server>"``. Raised only
#: (never lowered), published on the channel when raised, read by a link when it (re)joins
TIMELINES_KEY = PREFIX + ":timelines"
#: the clusters the fleet's timelines hash keeps (and a link's copy of it): past this many,
#: the one raised longest ago is forgotten (a fleet reaches a few clusters over its life)
MAX_TIMELINES = 64

#: the longest an opening of the fleet lasts from its start, in seconds: one by hand
#: (``_manual.MAX_OPEN_SECONDS``, a day; one by failures lasts the reset timeout, at most an
#: hour), with a second for rounding. A record's end (or a message's time left) further off is
#: none of the fleet's (milliseconds written for seconds, a year): read as missing, the opening
#: over, as an end that is no number (see ``opening_end`` in the scripts). Taken, one such
#: value kept every process's units of the service refused for ages
OPENING_MAX: Final = 86_401.0

_log = logging.getLogger("resilient_db.fleet")

#: a Redis that answered the connection's login with a refusal (redis-py raises its
#: ``AuthenticationError``, a ``ConnectionError``, though Redis did answer)
_LOGIN_REFUSED: Final = "login refused (wrong password or user)"
#: why a Redis that answered refused a command: (its error code, the redis client's exception
#: class, what it means). A script's error carries the code after a dash ("... -READONLY You
#: can't write against a read only replica.").
_ACL_REFUSED: Final = "no permission (ACL)"
_REFUSALS = (
    ("READONLY", "ReadOnlyError", "read-only replica, writes refused"),
    ("OOM", "OutOfMemoryError", "out of memory (maxmemory), writes refused"),
    ("NOPERM", "NoPermissionError", _ACL_REFUSED),
)
#: an error reply that only the URL can fix: the database number it names does not exist
_DB_OUT_OF_RANGE = re.compile(r"DB index is out of range", re.IGNORECASE)
_BAD_DB = "no such database number (SELECT refused)"
#: a key of the library's holding another type of value (see ``_wrong_type_text``)
_WRONG_TYPE = "a key of the wrong type"
#: the ACL refusals that carry no NOPERM code: a command refused inside a script, in Redis
#: 6.2's words ("The user executing the script can't run this command or subcommand", "...
#: can't publish to the channel ...", "... can't access at least one of the keys ...")
_ACL_WORDS = re.compile(r"user executing the script can't|no permissions? to", re.IGNORECASE)
#: what was refused, when the answer names it: "HSET on key resilient_db:alive refused: ..."
#: (the alive check's, and the subscription's, own words), or Redis 7's "... no permissions
#: to run the 'hset' command"
_REFUSED_WHAT = (
    re.compile(r"(?:^|: )([A-Z]+(?: on (?:key|channel) \S+)?) refused: "),
    re.compile(r"no permissions? to run the '([\w|]+)' command", re.IGNORECASE),
)


class FleetDown(Exception):
    """Redis did not answer (or the link is down): the caller uses its local state.

    ``sent``: the command went out and may have run all the same (a timeout, a connection lost
    after sending: Redis runs a command it received once it resumes, whatever became of its
    answer). False: it surely did not run (the link was down, so nothing was sent; the
    connection was refused; Redis answered an error). ``reservation``: the probe reservation
    of an admit whose answer was lost (set by the breaker, see ``Breaker.before_call``)."""

    def __init__(self, url: str, *, sent: bool = False) -> None:
        super().__init__(url)
        self.sent = sent
        self.reservation: str | None = None


# -- the scripts (Lua, run atomically by Redis) ---------------------------------------------------
# Times are Redis's own (TIME), so processes on hosts with different clocks agree; remaining open
# times travel as seconds from now. ``gen`` orders the changes of one breaker: microseconds of
# Redis time, strictly increasing (a flushed Redis starts again from 0, "no state yet").
_COMMON = """
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function next_gen(now, old)
  local g = math.floor(now * 1000000)
  if g <= old then g = old + 1 end
  return g
end
local function gstr(g) return string.format('%.0f', g) end
-- a number of a record as the scripts write it (Redis times, generations, counts): finite, not
-- negative, below 2^53 (exact in a double, where a generation of µs stays for centuries).
-- Anything with write access to the Redis may leave another (thousands of digits: inf to
-- tonumber; nan; inf; negative; no number at all): read as missing, as if Redis had lost it,
-- and the next change writes it anew. Taken as it was, an end of inf opened the breaker for
-- good, a generation of inf answered "inf" (no integer), a count of -1000 let 1000 probes in
local function num(v)
  local x = tonumber(v)
  if x == nil or x ~= x or x < 0 or x >= 9007199254740992 then return nil end
  return x
end
-- a generation (of the breaker's record, or of the caller's view) as the scripts write it: a
-- num no further ahead of Redis's time than any opening of the fleet lasts (OPENING_MAX: a
-- clock stepped back since, or another Redis's after a failover, is far closer). One further
-- off (2^53 - 2, ten years ahead: anything with write access may leave one) is read as
-- missing, as num reads other junk, so that no script answers with it or makes one after it.
-- Taken, each change after it made its own one more (2^53 two changes on, read as missing, and
-- the next from Redis's time again), and every process whose view held it took the fleet's
-- changes from Redis's time for older than its view, and ignored them until it restarted
local function gen_of(v, now)
  local g = num(v)
  if g == nil or g > (now + @OPENING_MAX@) * 1000000 then return nil end
  return g
end
-- a count (an integer num) that INCR and HINCRBY take
local function count(v)
  local x = num(v)
  if x == nil or x ~= math.floor(x) then return nil end
  return x
end
-- key k, of counts only (a breaker's failures, its probe reservations, a budget's), holding
-- another type of value than the scripts write there (WRONGTYPE: another client's) is
-- dropped, as when it expires: every script using it was refused, and the link went down at
-- every failure. ``cmd`` reads it as the scripts do (GET, HEXISTS: commands the ACL allows)
local function drop_wrong_type(k, cmd, ...)
  local r = redis.pcall(cmd, k, ...)
  if type(r) == 'table' and r.err then redis.call('DEL', k) end
end
-- 1 in a script that forces the state (open() or close(), see _FORCE): its message says so
local forced = nil
-- the operator's reason for a change made by hand ('' for none; see _FORCE): its message says it
local hand = nil
-- 1 in a script that wrote back the caller's view (see restore_view): its message says so
local restored = nil
local function publish(st, remaining, gen, opens)
  redis.call('PUBLISH', ARGV[1], cjson.encode(
    {s = ARGV[2], b = ARGV[3], st = st, r = tostring(remaining), g = gstr(gen), o = opens,
     f = forced, w = restored, h = hand}))
end
-- where the caller's view of the breaker starts in ARGV (set by the scripts that carry it):
-- its state ('' none to write back, 'open', 'half-open'), the seconds its opening has left,
-- the openings and the generation it saw, then '1' when the opening was made by hand (else
-- '0') and the operator's reason ('' for none)
local VIEW = nil
-- Redis lost the breaker's state (gen 0: restarted empty, flushed; or a generation none of the
-- fleet's, see gen_of: the record is no one's to trust) while the caller's view
-- holds the fleet's opening: write it back, as one opening already counted (its openings, not
-- one more) ending when it ended (no new reset timeout), or half-open with every probe slot
-- free when its time is up (the reservations were lost with the rest). An opening made by
-- hand comes back as one, with its reason (its message carries it: ``h``). The first caller
-- writes it; the others find it there and follow. The failures and reservations counted
-- since the loss go.
local function restore_view(now)
  local vst = VIEW and ARGV[VIEW]
  if vst ~= 'open' and vst ~= 'half-open' then return false end
  local left = tonumber(ARGV[VIEW + 1]) or 0
  local opens = tonumber(ARGV[VIEW + 2]) or 0
  local gen = next_gen(now, gen_of(ARGV[VIEW + 3], now) or 0)
  local vhand = ARGV[VIEW + 4] == '1' and '1' or '0'
  local vwhy = vhand == '1' and (ARGV[VIEW + 5] or '') or ''
  restored = 1
  local was = hand
  if vhand == '1' then hand = vwhy end
  if vst == 'open' and left > 0 then
    redis.call('HSET', KEYS[1], 'st', 'open', 'until', tostring(now + left), 'at',
               tostring(now), 'gen', gstr(gen), 'opens', opens, 'probes', 0, 'ok', 0, 'by', '',
               'hand', vhand, 'why', vwhy)
    publish('open', left, gen, opens)
  else
    redis.call('HSET', KEYS[1], 'st', 'half-open', 'hos', tostring(now), 'gen', gstr(gen),
               'opens', opens, 'probes', 0, 'ok', 0, 'by', '', 'hand', vhand, 'why', vwhy)
    publish('half-open', 0, gen, opens)
  end
  hand = was
  redis.call('DEL', KEYS[2], KEYS[3])
  return true
end
-- whether the state in force is a closing by hand (_FORCE's close; 'hclose' holds its
-- generation, so any later change, whichever script makes it, ends it: a probe closing the
-- breaker after an opening by hand is no closing by hand) -> '1' and the operator's reason
-- ('' for none), else '0', ''
local function closed_hand()
  local f = redis.call('HMGET', KEYS[1], 'hclose', 'gen', 'why')
  if f[1] and f[1] == f[2] then return '1', f[3] or '' end
  return '0', ''
end
-- who set the state ``st`` in force, for an answer: an opening's 'hand' and 'why' (h[at] and
-- h[at + 1], asked of read_breaker), the half-open state's after it (the opening's: half-opening
-- leaves them), a closing's (closed_hand) -> '1' and the operator's reason ('' for none), else
-- '0', '' (opened by failures, closed by probes)
local function hand_fields(st, h, at)
  if st == 'closed' then return closed_hand() end
  return h[at] or '0', h[at + 1] or ''
end
-- the time now, then the breaker hash (KEYS[1]): its fields st, until, gen, opens and any
-- further ones asked for (h[5], ...), its state, generation and openings. A state lost
-- while the caller's view holds an opening is written back first (see restore_view)
local function read_breaker(...)
  local now = now_s()
  drop_wrong_type(KEYS[2], 'GET')
  drop_wrong_type(KEYS[3], 'HEXISTS', '')
  local h = redis.call('HMGET', KEYS[1], 'st', 'until', 'gen', 'opens', ...)
  local gen = gen_of(h[3], now) or 0
  if gen == 0 and restore_view(now) then
    h = redis.call('HMGET', KEYS[1], 'st', 'until', 'gen', 'opens', ...)
    gen = gen_of(h[3], now) or 0
  end
  return now, h, h[1] or 'closed', gen, count(h[4]) or 0
end
-- when an open breaker read by read_breaker half-opens (Redis time). Its opening began at
-- 'at': a clock now before that stepped back since (NTP correcting the Redis host), and
-- would lengthen the opening by the step; it ends its whole reset timeout from now then
local function opening_end(h, now)
  local untl = num(h[2]) or now
  local at = num(redis.call('HGET', KEYS[1], 'at'))
  if at ~= nil and now < at then
    untl = now + (untl - at)
    redis.call('HSET', KEYS[1], 'until', tostring(untl), 'at', tostring(now))
  end
  -- further off than any opening of the fleet lasts (OPENING_MAX): none of the fleet's, over
  if untl > now + @OPENING_MAX@ then untl = now end
  return untl
end
-- seconds until an open breaker read by read_breaker half-opens
local function remaining(h, now) return tostring(opening_end(h, now) - now) end
-- open the breaker for reset seconds, forget its failures (KEYS[2]) and its probe reservations
-- (KEYS[3]), tell every process. In a Redis that has no state for the breaker (gen 0: restarted
-- empty, flushed) the openings count on from those the caller had seen (ARGV[VIEW + 2]), not
-- from 0: the fleet's count does not go back to 1 with the history Redis lost
local function open_breaker(now, gen, opens, reset)
  if gen == 0 and VIEW then opens = math.max(opens, tonumber(ARGV[VIEW + 2]) or 0) end
  gen = next_gen(now, gen)
  opens = opens + 1
  redis.call('HSET', KEYS[1], 'st', 'open', 'until', tostring(now + reset), 'at', tostring(now),
             'gen', gstr(gen), 'opens', opens, 'probes', 0, 'ok', 0, 'by', ARGV[3],
             'hand', '0', 'why', '', 'who', '', 'alone', '')
  redis.call('DEL', KEYS[2], KEYS[3])
  publish('open', reset, gen, opens)
  return gen, opens
end
""".replace("@OPENING_MAX@", f"{OPENING_MAX:.0f}")

# The probe reservations (KEYS[3] of every breaker script): a hash of reservation id -> '1' (it
# holds a probe slot) or '0' (it ended, or was released before its admit ran). Every admit
# carries an id its process drew before sending it, and every probe end names it: a script that
# ran although its answer was lost (Redis hung past the client's timeout, then resumed) and is
# sent again on rejoining finds its reservation ended and does nothing, and an admit that
# arrives after its release takes no slot. The hash is cleared at every state change and when
# the probe lease runs out (a reservation holds a slot only in the half-open state it was made
# in), and expires (twice the lease after its last write).

# An answer saying the breaker is open says too whether the opening was made by hand
# (open_breaker, close_breaker, the ``resilient-db breaker`` command: 'hand' and 'why' in the
# hash, see _FORCE) and the operator's reason: a process learning of the opening from it (its
# subscription dropped the message that said so) tells its lines and rejections the truth, not
# "another process's failures" (see _hand_of). An answer saying it is closed says so of a
# closing by hand ('hclose' in the hash, its generation: see closed_hand), so that such a
# process says the operator closed it, not that the database recovered.

# KEYS: breaker hash, failure counter, probe reservations. ARGV: channel, service, token,
# threshold, reset timeout (s), failure memory (ms), age of the failed attempt (s; -1: a probe,
# or not known), the failover window (s), the probe's reservation ('': none), the lease (s),
# then the caller's view (see restore_view).
# -> {state, remaining, gen, failures, opens, opened by this call, the run of failures, and
# for an open breaker, opened by this process (its token: another call of it, in another
# thread, may have opened it just before), then '1' when the opening was made by hand (else
# '0') and its reason (see _hand_of); for a closed breaker 0, then whether it was closed by
# hand, and why}
# An attempt that began before the last failure counted (by any process: its Redis time is
# ``lastfail`` in the breaker hash) and fails within the failover window after it was in flight
# when the database failed: the same event seen again, not counted (one failover cutting off a
# unit in each of N processes is one failure, as it is for N threads of one process). One
# failing later counts, whenever it began (a hung database's attempts fail one connect timeout
# after they began: each window of them counts once). The age travels rather than a start time,
# so the hosts' clocks don't matter.
# A half-open probe's failure names its reservation: it opens the breaker only while that
# reservation holds a slot (a probe let through in an earlier half-open state, or one whose
# lease ran out and whose slot was given again, counts nowhere, as its success would not).
# The run of failures (``run`` in the breaker hash) is the Redis time its first failure was
# counted: a success resets the count only in a process that saw that run (see _RESET).
_FAILURE = (
    _COMMON
    + """
VIEW = 11
local now, h, st, gen, opens = read_breaker('lastfail', 'run', 'by', 'hand', 'why')
local reset = tonumber(ARGV[5])
local age = tonumber(ARGV[7])
local rid = ARGV[9]
local run = h[6] or ''
local function open()
  gen, opens = open_breaker(now, gen, opens, reset)
  return {'open', tostring(reset), gstr(gen), 0, opens, 1, '', 1, '0', ''}
end
-- the state left as it was, with ``n`` failures counted (closed: whether by hand, and why)
local function unchanged(n)
  return {st, '0', gstr(gen), n, opens, 0, run, 0, hand_fields(st, h, 8)}
end
if st == 'open' then
  return {'open', remaining(h, now), gstr(gen), 0, opens, 0, '', h[7] == ARGV[3] and 1 or 0,
          hand_fields(st, h, 8)}
end
if rid ~= '' then
  local held = redis.call('HGET', KEYS[3], rid)
  if held ~= '0' then
    redis.call('HSET', KEYS[3], rid, '0')
    redis.call('PEXPIRE', KEYS[3], math.floor(tonumber(ARGV[10]) * 2000))
  end
  if st == 'half-open' and held == '1' then return open() end
  return unchanged(count(redis.call('GET', KEYS[2])) or 0)
end
if age >= 0 then
  local last = num(h[5])
  -- (a last failure ahead of the clock: it stepped back since, and the window is not known)
  if last ~= nil and last <= now and now - age < last and now - last < tonumber(ARGV[8]) then
    return unchanged(count(redis.call('GET', KEYS[2])) or 0)
  end
  redis.call('HSET', KEYS[1], 'lastfail', string.format('%.6f', now))
end
if st == 'half-open' then return open() end
-- (a count that is none of ours: INCR would refuse it, at every failure)
local counted = redis.call('GET', KEYS[2])
if counted and count(counted) == nil then redis.call('DEL', KEYS[2]) end
local n = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
if n == 1 then
  run = string.format('%.6f', now)
  redis.call('HSET', KEYS[1], 'run', run)
end
if n >= tonumber(ARGV[4]) then return open() end
return unchanged(n)
"""
)

# KEYS: breaker hash, failure counter. ARGV: the run of failures the process saw (see
# _FAILURE). A success forgets the failures counted while closed only when they are that run:
# a process whose own failure expired from the fleet's memory (a new run began since, made
# by other processes' failures) leaves the new run's count alone. -> 1 reset, 0 not
_RESET = """
local run = redis.call('HGET', KEYS[1], 'run')
if run and run == ARGV[1] then
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
"""

# KEYS: breaker hash, failure counter, probe reservations. ARGV: channel, service, token,
# probes, lease (s), reservation id, then the caller's view (see restore_view).
# -> {decision (probe|closed|open|full), remaining, gen, opens, and for an open breaker
# whether this process (its token) opened it (else 0), then whether the state was set by hand
# and why (see _hand_of): an opening's, the half-open state's after it, a closing's}
_ADMIT = (
    _COMMON
    + """
VIEW = 7
local now, h, st, gen, opens = read_breaker('probes', 'hos', 'by', 'hand', 'why')
if st == 'closed' then return {'closed', '0', gstr(gen), opens, 0, hand_fields(st, h, 8)} end
local rid = ARGV[6]
local function reserve()
  redis.call('HSET', KEYS[3], rid, '1')
  redis.call('PEXPIRE', KEYS[3], math.floor(tonumber(ARGV[5]) * 2000))
end
-- released (or ended) before it ran: its process went on without it, it takes no slot
local released = redis.call('HEXISTS', KEYS[3], rid) == 1
if st == 'open' then
  local untl = opening_end(h, now)
  if now < untl or released then
    return {'open', tostring(math.max(0, untl - now)), gstr(gen), opens,
            h[7] == ARGV[3] and 1 or 0, hand_fields(st, h, 8)}
  end
  gen = next_gen(now, gen)
  redis.call('HSET', KEYS[1], 'st', 'half-open', 'hos', tostring(now), 'probes', 1, 'ok', 0,
             'gen', gstr(gen))
  redis.call('DEL', KEYS[3])
  reserve()
  -- (the half-open state after an opening by hand is said so: its message carries the reason)
  if h[8] == '1' then hand = h[9] or '' end
  publish('half-open', 0, gen, opens)
  return {'probe', '0', gstr(gen), opens, 0, hand_fields('half-open', h, 8)}
end
if released then return {'full', '0', gstr(gen), opens, 0, hand_fields(st, h, 8)} end
local probes = count(h[5]) or 0
local hos = num(h[6]) or now
if now < hos then
  -- the clock stepped back since the breaker half-opened: the lease runs from now
  redis.call('HSET', KEYS[1], 'hos', tostring(now))
  hos = now
end
if now - hos > tonumber(ARGV[5]) then
  -- the lease ran out: the slots are given again, the reservations made so far hold none
  probes = 0
  redis.call('HSET', KEYS[1], 'hos', tostring(now))
  redis.call('DEL', KEYS[3])
end
if probes < tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'probes', probes + 1)
  reserve()
  return {'probe', '0', gstr(gen), opens, 0, hand_fields(st, h, 8)}
end
return {'full', '0', gstr(gen), opens, 0, hand_fields(st, h, 8)}
"""
)

# KEYS: breaker hash, failure counter, probe reservations. ARGV: channel, service, probes
# needed to close, 1 = the probe succeeded / 0 = it ended neither way or its admit's answer was
# lost (its slot is released), its reservation id, the lease (s). Applied once per reservation,
# and only while it holds a slot: a report that ran already, or one of a probe let through in an
# earlier half-open state (a probe reported late, after a Redis blip), does nothing; a
# reservation not made yet is marked ended, so that its admit, arriving late, takes no slot.
# Then the caller's view (see restore_view): a probe ending after Redis lost its reservation
# finds it nowhere, and counts nowhere. -> {state, remaining, gen, opens, then whether that
# state was set by hand and why (see _hand_of)}; a closing by this probe is no change by hand
_PROBE_DONE = (
    _COMMON
    + """
VIEW = 8
local now, h, st, gen, opens = read_breaker('probes', 'ok', 'hand', 'why')
local rid = ARGV[6]
local held = redis.call('HGET', KEYS[3], rid)
if held ~= '0' then
  redis.call('HSET', KEYS[3], rid, '0')
  redis.call('PEXPIRE', KEYS[3], math.floor(tonumber(ARGV[7]) * 2000))
end
if st ~= 'half-open' then
  return {st, st == 'open' and remaining(h, now) or '0', gstr(gen), opens, hand_fields(st, h, 7)}
end
if held ~= '1' then return {st, '0', gstr(gen), opens, hand_fields(st, h, 7)} end
local probes = math.max(0, (count(h[5]) or 0) - 1)
if ARGV[5] == '1' then
  local ok = (count(h[6]) or 0) + 1
  if ok >= tonumber(ARGV[4]) then
    gen = next_gen(now, gen)
    redis.call('HSET', KEYS[1], 'st', 'closed', 'probes', 0, 'ok', 0, 'gen', gstr(gen))
    redis.call('DEL', KEYS[2], KEYS[3])
    publish('closed', 0, gen, opens)
    return {'closed', '0', gstr(gen), opens}
  end
  redis.call('HSET', KEYS[1], 'probes', probes, 'ok', ok)
else
  redis.call('HSET', KEYS[1], 'probes', probes)
end
return {'half-open', '0', gstr(gen), opens, hand_fields(st, h, 7)}
"""
)

# KEYS: breaker hash, failure counter, probe reservations. ARGV: channel, service, token,
# state to force ('' = read only), the seconds an opening lasts, then the caller's view (see
# restore_view: a read on rejoining writes back an opening Redis lost), then the operator's
# reason ('' for none) and who made the change (kept as ``who`` for ``resilient-db breaker
# status``: the command, or a process, with its pid and host).
# -> {state, remaining, gen, opens, '1' when that state was set by hand (else '0'), its reason}
# A change by hand (open_breaker, close_breaker) is an operator's: its message carries ``f``
# (forced) and ``h`` (the reason), so that the processes taking it, the caller's own
# background thread included, say so, not "failures"; the hash keeps ``hand`` and ``why``
# while the opening lasts (an opening by failures sets ``hand`` back to '0', see
# open_breaker; one written back into a Redis that lost it keeps them, see restore_view), and
# ``hclose`` (the generation of a closing by hand) and ``why`` while that closing is the last
# change (any later one has another generation: see closed_hand), so that a process reading
# the state (starting, rejoining, its subscription having dropped the message) says so too.
_FORCE = (
    _COMMON
    + """
VIEW = 6
local now, h, st, gen, opens = read_breaker('hand', 'why')
forced = 1
local want = ARGV[4]
if want == '' then
  local left = st == 'open' and remaining(h, now) or '0'
  return {st, left, gstr(gen), opens, hand_fields(st, h, 5)}
end
local reset = tonumber(ARGV[5])
hand = ARGV[12] or ''
if want == 'open' then
  gen, opens = open_breaker(now, gen, opens, reset)
  redis.call('HSET', KEYS[1], 'hand', '1', 'why', hand, 'who', ARGV[13] or '')
else
  gen = next_gen(now, gen)
  redis.call('HSET', KEYS[1], 'st', 'closed', 'gen', gstr(gen), 'probes', 0, 'ok', 0,
             'hand', '0', 'why', hand, 'hclose', gstr(gen), 'who', ARGV[13] or '')
  redis.call('DEL', KEYS[2], KEYS[3])
  publish(want, 0, gen, opens)
  reset = 0
end
return {want, tostring(reset), gstr(gen), opens, '1', hand}
"""
)

# KEYS: breaker hash, failure counter, probe reservations. ARGV: channel, service, token, the
# seconds an opening this process made on its own (while Redis did not answer it) has left,
# its age (s), then a view with nothing to write back, for the openings it had seen (see
# open_breaker), then '1' when that opening was made by hand (else '0'), the operator's reason
# ('' for none) and who made it, then the opening's name (drawn by the process when it made
# it; '' for none). Shared when the breaker is not open and changed last before
# that opening (gen 0: it never changed): this process's failures (or its operator) would have
# opened it, had Redis heard them. Shared as what it is: an opening by hand keeps 'hand', 'why'
# and 'who', and its message carries the reason (``h``, not ``f``: no change made now by hand,
# the one made then), so that the other processes say it was by hand. Else only read: the
# fleet's opening, or a change made since, is followed. The opening in force being the one
# named (kept as 'alone' until the next opening), shared by an earlier call whose answer was
# lost (Redis ran it, the link timed out), it is answered as opened by this call: the caller
# never took it, and is not to follow it as another process's.
# -> {state, remaining, gen, opens, opened by this call, then whether the state was set by hand
# and why (see _hand_of)}
_SHARE_OPENING = (
    _COMMON
    + """
VIEW = 6
local now, h, st, gen, opens = read_breaker('hand', 'why', 'alone')
local name = ARGV[15] or ''
if st == 'open' and name ~= '' and h[7] == name then
  return {'open', remaining(h, now), gstr(gen), opens, 1, hand_fields(st, h, 5)}
end
if st ~= 'open' and gen / 1000000 < now - tonumber(ARGV[5]) then
  local by_hand = ARGV[12] == '1'
  if by_hand then hand = ARGV[13] or '' end
  gen, opens = open_breaker(now, gen, opens, tonumber(ARGV[4]))
  redis.call('HSET', KEYS[1], 'alone', name)
  if by_hand then
    redis.call('HSET', KEYS[1], 'hand', '1', 'why', hand, 'who', ARGV[14] or '')
    return {'open', ARGV[4], gstr(gen), opens, 1, '1', hand}
  end
  return {'open', ARGV[4], gstr(gen), opens, 1, '0', ''}
end
local left = st == 'open' and remaining(h, now) or '0'
return {st, left, gstr(gen), opens, 0, hand_fields(st, h, 5)}
"""
)

# KEYS: budget hash. ARGV: ratio, floor (retries/s), window (s), 1 = spend one retry / 0 = only
# count, the number N of pairs that follow for retries spent, then N pairs (age in whole
# seconds, count) of ratio-paid retries the process spent alone while Redis did not answer,
# then new first attempts as pairs (age, count): each is added to its own second of Redis
# time, those past the window not at all.
# -> {paid by ('ratio' | 'floor' | ''), first attempts in window, retries in window, floor tokens,
#     Redis's time (s)}
_BUDGET = (
    _COMMON
    + """
local now = now_s()
drop_wrong_type(KEYS[1], 'HEXISTS', '')
local sec = math.floor(now)
local window = tonumber(ARGV[3])
local alone_end = 5 + 2 * tonumber(ARGV[5])
-- add n to field f: a value there that is none of ours (HINCRBY would refuse it, at every
-- call) goes first
local function add(f, n)
  local was = redis.call('HGET', KEYS[1], f)
  if was and count(was) == nil then redis.call('HDEL', KEYS[1], f) end
  redis.call('HINCRBY', KEYS[1], f, n)
end
for i = 6, #ARGV - 1, 2 do
  local age, amount = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  if age >= 0 and age < window and amount > 0 then
    local kind = 'd'
    if i < alone_end then kind = 'w' end
    add(kind .. (sec - age), ARGV[i + 1])
  end
end
local all = redis.call('HGETALL', KEYS[1])
local deposits, spent, tokens, ts = 0, 0, nil, nil
for i = 1, #all, 2 do
  local f, v = all[i], all[i + 1]
  local kind = string.sub(f, 1, 1)
  if f == 'ft' then tokens = num(v)
  elseif f == 'fts' then ts = num(v)
  elseif kind == 'd' or kind == 'w' then
    -- (a second, or a count, that is none of ours goes: see num). So does a second past
    -- Redis's now: its clock was set back since (NTP, a VM restored, a failover to a replica
    -- whose clock lags), and kept it would stay within the window until the clock reached it
    -- again (set back an hour: first attempts paying, or retries refusing, for an hour). The
    -- budget starts over, as when Redis loses the hash
    local s, n = num(string.sub(f, 2)), count(v)
    if s == nil or s <= sec - window or s > sec or n == nil then redis.call('HDEL', KEYS[1], f)
    elseif kind == 'd' then deposits = deposits + n
    else spent = spent + n end
  end
end
local floor = tonumber(ARGV[2])
if tokens == nil or ts == nil then tokens, ts = floor, now end
tokens = math.min(floor, tokens + math.max(0, now - ts) * floor)
local paid = ''
if ARGV[4] == '1' then
  if tonumber(ARGV[1]) * deposits - spent >= 1 then
    add('w' .. sec, 1)
    spent = spent + 1
    paid = 'ratio'
  elseif tokens >= 1 then
    tokens = tokens - 1
    paid = 'floor'
  end
end
redis.call('HSET', KEYS[1], 'ft', tostring(tokens), 'fts', tostring(now))
redis.call('PEXPIRE', KEYS[1], (window + 60) * 1000)
return {paid, tostring(deposits), spent, tostring(tokens), string.format('%.6f', now)}
"""
)

# KEYS: a key of ours. ARGV: this link's token, the channel. Writes, so that a Redis refusing
# writes (READONLY, OOM) is not taken for one that answers; and every command the other scripts
# run, on this key, and a PUBLISH on the channel (a message every process ignores), so that an
# ACL refusing one of them (NOPERM) keeps the link down instead of letting the failure path
# fail at once, again and again. The answer names the command refused, and what it was
# refused on. The key ends as it always was: this token, for 10 s.
_ALIVE = """
local k, token, channel = KEYS[1], ARGV[1], ARGV[2]
local steps = {
  {'TIME'}, {'DEL', k}, {'HSET', k, 'n', '1'}, {'PEXPIRE', k, 10000}, {'HEXISTS', k, 'n'},
  {'HGET', k, 'n'}, {'HMGET', k, 'n'}, {'HINCRBY', k, 'n', 1}, {'HGETALL', k},
  {'HDEL', k, 'n'}, {'INCR', k}, {'GET', k}, {'DEL', k}, {'SET', k, token, 'PX', 10000},
  {'PUBLISH', channel, cjson.encode({alive = token})},
}
for _, step in ipairs(steps) do
  local r = redis.pcall(unpack(step))
  if type(r) == 'table' and r.err then
    local on = ' on key ' .. k
    if step[1] == 'PUBLISH' then on = ' on channel ' .. channel
    elseif step[1] == 'TIME' then on = '' end
    return redis.error_reply(step[1] .. on .. ' refused: ' .. r.err)
  end
end
return 1
"""

# KEYS: budget hash (see _BUDGET). ARGV: what paid for the retry given
# back ('ratio' | 'floor'), seconds since it was paid (this process's clock: a duration, which
# hosts' clocks agree on), floor (retries/s), window (s). A ratio-paid retry leaves the second of
# Redis time it was spent in (give or take the round trip: the nearest of that second and its
# neighbours holding one); a floor-paid one goes back into the bucket. Nothing when what it was
# spent in has expired, or Redis lost the hash (flushed: the budget starts over anyway).
# -> 1 given back, 0 nothing to give back
_BUDGET_REFUND = (
    _COMMON
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local sec = math.floor(now)
drop_wrong_type(KEYS[1], 'HEXISTS', '')
if ARGV[1] == 'ratio' then
  local paid = math.floor(now - tonumber(ARGV[2]))
  local window = tonumber(ARGV[4])
  for _, s in ipairs({paid, paid + 1, paid - 1}) do
    if s > sec - window and s <= sec then
      local f = 'w' .. s
      -- (a count that is none of ours: left for the budget's script, which drops it)
      local n = count(redis.call('HGET', KEYS[1], f)) or 0
      if n > 1 then
        redis.call('HINCRBY', KEYS[1], f, -1)
        return 1
      elseif n == 1 then
        redis.call('HDEL', KEYS[1], f)
        return 1
      end
    end
  end
elseif ARGV[1] == 'floor' then
  local h = redis.call('HMGET', KEYS[1], 'ft', 'fts')
  local tokens, ts, floor = num(h[1]), num(h[2]), tonumber(ARGV[3])
  if tokens ~= nil and ts ~= nil then
    tokens = math.min(floor, tokens + math.max(0, now - ts) * floor + 1)
    redis.call('HSET', KEYS[1], 'ft', tostring(tokens), 'fts', tostring(now))
    return 1
  end
end
return 0
"""
)


# KEYS: the timelines hash (TIMELINES_KEY). ARGV: channel, token, a cluster's system identifier,
# the timeline this process saw it on as a primary, the server it saw it at, the clusters kept
# (MAX_TIMELINES). Raises the cluster's timeline (never lowers it), publishes it when raised
# (with the entry's Redis time, µs: ``us``), and forgets the clusters raised longest ago past
# the bound.
# -> the cluster's entry now ("<timeline> <Redis time> <server>")
_TIMELINE = """
local old = redis.call('HGET', KEYS[1], ARGV[3])
if old then
  -- (an entry none of ours, as _timeline_entry reads it, is written over: a timeline of
  -- thousands of digits, inf to tonumber, kept the cluster's real one from the fleet)
  local tl, us = string.match(old, '^(%d+) (%d+)')
  local seen = tl and #tl + #us <= 40 and tonumber(tl)
  if seen and seen >= tonumber(ARGV[4]) then return old end
end
local t = redis.call('TIME')
local us = t[1] .. string.format('%06d', tonumber(t[2]))
local value = ARGV[4] .. ' ' .. us .. ' ' .. ARGV[5]
redis.call('HSET', KEYS[1], ARGV[3], value)
-- (counted from HGETALL, a command the documented ACL allows already, as HLEN is not)
local all = redis.call('HGETALL', KEYS[1])
local extra = #all / 2 - tonumber(ARGV[6])
if extra > 0 then
  local order = {}
  for i = 1, #all, 2 do
    if all[i] ~= ARGV[3] then
      table.insert(order, {all[i], tonumber(string.match(all[i + 1], '^%d+ (%d+)')) or 0})
    end
  end
  table.sort(order, function(a, b) return a[2] < b[2] end)
  for i = 1, math.min(extra, #order) do redis.call('HDEL', KEYS[1], order[i][1]) end
end
local said = {tl = ARGV[3], t = ARGV[4], at = ARGV[5], us = us, b = ARGV[2]}
redis.call('PUBLISH', ARGV[1], cjson.encode(said))
return value
"""


_SCRIPTS = {
    "alive": _ALIVE,
    "failure": _FAILURE,
    "reset_failures": _RESET,
    "admit": _ADMIT,
    "probe_done": _PROBE_DONE,
    "force": _FORCE,
    "share_opening": _SHARE_OPENING,
    "budget": _BUDGET,
    "budget_refund": _BUDGET_REFUND,
    "timeline": _TIMELINE,
}


class _Keys(NamedTuple):
    """The keys of ``service`` (one hash slot): its breaker's hash, failure counter and probe
    reservations (the breaker scripts' KEYS, in this order), and its budget's hash."""

    breaker: str
    failures: str
    probes: str
    budget: str


def _keys(service: str) -> _Keys:
    tag = f"{PREFIX}:{{{service}}}"
    return _Keys(f"{tag}:breaker", f"{tag}:failures", f"{tag}:probes", f"{tag}:budget")


def _breaker_keys(service: str) -> list[str]:
    """The KEYS of ``service``'s breaker scripts."""
    return list(_keys(service)[:3])


#: a process's view of a shared breaker's opening, for Redis to write back if it lost the
#: breaker's state (restarted empty, flushed): ``("open", seconds left, openings, gen, hand)``
#: or ``("half-open", 0.0, openings, gen, hand)``, ``hand`` the operator's reason when the
#: opening was made by hand (``""``: none given), None when failures made it; None: nothing to
#: write back (see ``restore_view`` in the scripts, and ``Breaker.lost_view``)
View = tuple[str, float, int, int, str | None]


def _view_args(view: View | None, opens: int = 0) -> list[Any]:
    """The six ARGV of a script that carries the caller's view (see ``restore_view``); with
    no view to write back, ``opens``: the openings the caller had seen (a script opening the
    breaker in a Redis that lost its state counts on from them, see ``open_breaker``)."""
    if view is None:
        return ["", 0, opens, 0, "0", ""]
    state, left, seen, gen, hand = view
    return [state, round(left, 3), seen, gen, "0" if hand is None else "1", hand or ""]


def _import_redis() -> Any:
    try:
        import redis  # noqa: PLC0415 - optional dependency, needed only with a Redis URL
        import redis.backoff  # noqa: PLC0415
        import redis.retry  # noqa: PLC0415
    except ImportError:
        raise ConfigError(
            {
                "SELF_HEALING_REDIS_URL": "is set, but the redis package is not installed: "
                "pip install 'resilient-db[redis]'"
            }
        ) from None
    return redis


class FleetLink:
    """The connection of this process to one Redis: scripts, pub/sub and the background thread.

    Breakers and budgets attach by service name (:func:`attach`, :func:`detach`). ``up`` is True
    while Redis answers; the failure-path methods raise :class:`FleetDown` when it does not
    (after marking it down). ``problem`` is why the link is down, in a few words and without
    the password (None while it answers, and before its first attempt has ended).
    """

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
    ) -> None:
        """``start`` False: the caller attaches first, then calls :meth:`start` (so the first
        warning, made at once when the client refuses the URL or Redis is down, names the
        services)."""
        assert config.redis_url is not None
        self._redis = _import_redis()
        self.url = config.redis_url
        self.masked_url = mask_url(config.redis_url)
        self.config = config
        self._clock = clock
        self.up = False
        self.closed = False
        self.problem: str | None = None
        self.commands = 0  # commands sent by this process (failure path and background)
        #: names this process in the messages it causes (its own changes, seen from pub/sub)
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.breakers: dict[str, Any] = {}
        self.budgets: dict[str, Any] = {}
        self._new_locks()
        self._first_attempt = threading.Event()  # (each start makes its own)
        self._first_wait_until: float | None = None
        #: the fleet's highest timeline of each cluster (system identifier): (timeline, the
        #: server it was seen at, when Redis recorded it: seconds since the epoch, None where
        #: a message did not say), as Redis said it (read on joining, then its messages);
        #: kept while the link is down (a timeline is never lowered). See TIMELINES_KEY
        self.timelines: dict[str, tuple[int, str, float | None]] = {}
        #: timelines this process saw that Redis has not taken yet (sent by the thread)
        self._timelines_out: dict[str, tuple[int, str]] = {}
        if start:
            self._start()

    def start(self) -> None:
        """Build the client and start the thread of a link made with ``start=False``."""
        self._start()

    def services(self) -> list[str]:
        """The services attached now (by a breaker or a budget), sorted: the link's lines name
        them (one Redis may serve several services of this process). No Redis round trip."""
        with self._lock:
            return self._services_locked()

    def _services_locked(self) -> list[str]:
        return sorted({*self.breakers, *self.budgets})

    def _new_locks(self) -> None:
        """Locks and the down-warning's memory, at creation and in a forked child (where the
        parent's locks may be held by threads that do not exist)."""
        self._lock = threading.Lock()
        # held while the client and thread are stopped or started (a new timeout, close())
        self._restart_lock = threading.RLock()
        self._down_logged_at = -math.inf
        self._down_since: float | None = None
        self._down_at = -math.inf  # the last time a command failed
        self._down_warned = False  # this down period's warning was logged

    def _start(self) -> None:
        """Build the client (the configured timeout on every socket) and start the thread; a
        client that cannot be built leaves the link down, with one warning, and never raises
        into the caller (a factory being made, a unit's first call)."""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: set once this start's first attempt to reach Redis has ended, up or down (see
        #: :meth:`wait_first_attempt`), and when the link stops
        self._first_attempt = threading.Event()
        #: when failure-path calls stop waiting for that attempt: the first one to wait
        #: sets it, the Redis timeout later (one bound for them all)
        self._first_wait_until = None
        redis = self._redis
        timeout = self.config.redis_timeout
        try:
            self._client: Any = redis.Redis.from_url(
                self.url,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                # no client-side retries: one attempt within the timeout, then the local state
                retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
                health_check_interval=0,
            )
        except Exception as exc:  # the client refuses the URL: this process decides alone
            self._client = None
            self._scripts: dict[str, Any] = {}
            problem = self.problem = client_problem(exc, self.url)
            services = self.services()
            _emit_for_services(
                self.config,
                services,
                logging.WARNING,
                "Shared state unavailable: Redis at %s%s cannot be used (%s); circuit breakers "
                "and retry budgets run on this process's own state",
                self.masked_url,
                _naming(services),
                problem,
                event="shared_state_down",
                redis=self.masked_url,
                error=type(exc).__name__,
                problem=problem,
            )
            self._first_attempt.set()
            return
        self.channel = CHANNEL.format(db=self._client.get_connection_kwargs().get("db") or 0)
        self._scripts = {name: self._client.register_script(src) for name, src in _SCRIPTS.items()}
        self._thread = threading.Thread(
            target=self._run, name=f"resilient_db-redis {self.masked_url}", daemon=True
        )
        self._thread.start()

    def _stop_thread(self, timeout: float) -> None:
        """Stop the background thread, then drop the client's connections (``timeout``: the
        socket timeout the thread's client has)."""
        with self._lock:  # (a thread marking the link up checks its stop under the lock)
            self._stop.set()
            self.up = False
        self._first_attempt.set()  # nobody waits for a link that stops
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout=2 * _TICK + timeout + 0.5)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    def reconfigure(self, config: Config) -> None:
        """Take ``config`` (a reload, or another factory's settings for this Redis). A new
        timeout restarts the client and the thread; meanwhile, a few milliseconds, breakers and
        budgets run on their local state as while Redis is down (without a warning), their
        failure path waiting for the new thread's first attempt as at the start (see
        :meth:`wait_first_attempt`)."""
        with self._restart_lock:
            old, self.config = self.config, config
            if self.closed or old.redis_timeout == config.redis_timeout:
                return
            self._stop_thread(old.redis_timeout)
            self._start()

    def __repr__(self) -> str:
        return f"<FleetLink {self.masked_url} {'up' if self.up else 'down'}>"

    @property
    def down_since(self) -> float | None:
        """When (``time.monotonic()``) the link went down, while it is down, or rejoining;
        None while it is up (or before its first attempt ended)."""
        return self._down_since

    @property
    def connecting(self) -> bool:
        """Whether the first attempt of the link's thread to reach Redis has not ended yet: a
        failure-path call finding the link not up waits for it (see
        :meth:`wait_first_attempt`), so an async unit makes it off the event loop."""
        return not self._first_attempt.is_set()

    def wait_first_attempt(self) -> None:
        """The failure path of a breaker or budget finding the link not up: while the first
        attempt of its thread to reach Redis has not ended (a process just started, or
        forked: the link connects in the background, ~10 ms on a local Redis), wait for it,
        then decide as the fleet says, or alone when Redis did not answer. A fresh process
        deciding alone at once would start from a closed breaker and a full floor of retries
        whatever the fleet's state, so every worker of a restart storm would add its own.

        Bounded by the Redis timeout counted from the first call that waits, for every call
        (threads, an event loop's tasks): together they wait at most that long once. Never
        on the success path: the first unit's admission does not wait. Returns at once once
        the attempt has ended, whatever it found, and in the link's own thread."""
        first = self._first_attempt
        if first.is_set() or threading.current_thread() is self._thread:
            return
        now = time.monotonic()
        with self._lock:
            if self._first_wait_until is None:
                self._first_wait_until = now + self.config.redis_timeout
            until = self._first_wait_until
        if until > now:
            first.wait(until - now)

    # -- attachments (see attach and detach) ---------------------------------------------------
    def sync_breaker(self, breaker: Any) -> None:
        """Give a breaker just attached the shared state (when Redis answers; else the thread
        does on connecting), sharing first an opening of its own it holds (see
        ``Breaker.fleet_rejoin``)."""
        if self.up:
            with contextlib.suppress(FleetDown):
                breaker.fleet_rejoin(self, background=False)

    # -- timelines (the fence of an old primary back as a primary, see TIMELINES_KEY) ------
    def known_timelines(self) -> dict[str, FleetTimelineHealth]:
        """What this link knows of the fleet's timelines, for ``health()``: by cluster
        (system identifier), ``timeline``, the ``server`` it was seen at and ``since`` when
        (Redis time it was recorded, seconds since the epoch; None where the message it came
        by did not say: one of an earlier release's process). In memory."""
        with self._lock:
            known = sorted(self.timelines.items())
        return {
            system: {"timeline": t, "server": server, "since": since}
            for system, (t, server, since) in known
        }

    def share_timeline(self, system: str, timeline: int, server: str) -> None:
        """This process saw ``timeline`` of cluster ``system`` on a primary at ``server``:
        shared with the fleet by the background thread, unless the fleet's is as high. No
        Redis round trip here (a connect never waits for Redis); kept while Redis is down,
        sent on rejoining. Timeline 1, a cluster's first, is never sent: no primary is on a
        lower one, so it fences nothing (a fleet whose clusters never failed over writes
        nothing)."""
        if timeline <= 1:
            return
        with self._lock:
            known = self.timelines.get(system)
            if known is None or known[0] < timeline:
                self._queue_timeline_locked(system, timeline, server)

    def _queue_timeline_locked(self, system: str, timeline: int, server: str) -> None:
        """Have the thread send ``timeline`` of cluster ``system`` (under ``_lock``), unless
        one as high is queued already."""
        out = self._timelines_out.get(system)
        if out is None or out[0] < timeline:
            _bounded_put(self._timelines_out, system, (timeline, server))

    def _send_timelines(self) -> None:
        """The background thread, the link up: send the timelines this process saw first
        (one script each; raises what the store raises: kept, sent on rejoining)."""
        with self._lock:
            out = list(self._timelines_out.items())
        for system, (timeline, server) in out:
            self.commands += 1
            answer = self._run_script(
                "timeline",
                [TIMELINES_KEY],
                [self.channel, self.token, system, timeline, server, MAX_TIMELINES],
            )
            with self._lock:
                if self._timelines_out.get(system) == (timeline, server):
                    del self._timelines_out[system]
            self._learn_entry(system, _s(answer))

    def _read_timelines(self) -> None:
        """On (re)joining: the fleet's timelines (messages may have been lost meanwhile). A
        Redis without any (restarted empty, flushed) while this link knows some has lost
        them: they are written back (sent next, see :meth:`_rejoin`), or a process started
        from now on would not refuse an old primary the running ones refuse. A healthy
        fleet's links know none: nothing is written."""
        self.commands += 1
        with self._naming_wrong_type([TIMELINES_KEY]):
            found = self._client.hgetall(TIMELINES_KEY)
        for system, value in list(found.items())[:MAX_TIMELINES]:
            self._learn_entry(_shown(system), _s(value))
        if found:
            return
        with self._lock:
            for system, (timeline, server, _) in self.timelines.items():
                self._queue_timeline_locked(system, timeline, server)

    def _learn_entry(self, system: str, value: str) -> None:
        """The fleet's entry ``value`` of cluster ``system`` (see :func:`_timeline_entry`)
        learnt, unless it is not one of ours."""
        entry = _timeline_entry(value)
        if entry is not None:
            self._learn_timeline(system, entry[0], entry[2], entry[1])

    def _learn_timeline(self, system: str, timeline: int, server: str, since: float | None) -> None:
        """The fleet's ``timeline`` of cluster ``system``, seen at ``server`` (``""``: not
        said), recorded by Redis at ``since`` (None: not said): kept where it raises this
        link's, and told to the engines' fences."""
        server = server or "an unknown address"
        with self._lock:
            known = self.timelines.get(system)
            if known is not None and known[0] >= timeline:
                return
        # The engines' fences are told first, the link's own copy (what ``health()`` and
        # :func:`fleet_timeline` read) raised after: once it shows the timeline, no engine of
        # this process takes a connection below it (only this thread raises the copy).
        with _FENCES_LOCK:
            fences = list(_FENCES)
        for fence in fences:
            fence.fleet_timeline(system, timeline, server)
        with self._lock:
            _bounded_put(self.timelines, system, (timeline, server, since))

    # -- failure-path calls ------------------------------------------------------------------
    def _call(
        self, name: str, keys: list[str], args: list[Any], *, background: bool = False
    ) -> Any:
        if background:  # the background thread handles failures itself
            self.commands += 1
            return self._run_script(name, keys, args)
        if not self.up:
            raise FleetDown(self.masked_url)
        try:
            self.commands += 1
            return self._run_script(name, keys, args)
        except Exception as exc:  # any failure of the store: this process decides alone
            self.mark_down(exc)
            raise FleetDown(self.masked_url, sent=self._may_have_run(exc)) from exc

    def _run_script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run script ``name``. Refused for a key that holds another type of value than the
        script's commands take (WRONGTYPE: a string where a hash is, written by another
        client), the error names the keys, as Redis's answer does not."""
        with self._naming_wrong_type(keys):
            return self._scripts[name](keys=keys, args=args)

    @contextlib.contextmanager
    def _naming_wrong_type(self, keys: list[str]) -> Iterator[None]:
        """A command refused with WRONGTYPE inside raises its error naming ``keys``."""
        try:
            yield
        except self._redis.exceptions.ResponseError as exc:
            if not _wrong_type(exc):
                raise
            raise type(exc)(_wrong_type_text(keys)) from exc

    def _may_have_run(self, exc: BaseException) -> bool:
        """Whether a command that failed with ``exc`` may run in Redis all the same: it was
        sent, and Redis may have it (a timeout: a Redis that hung runs it when it resumes; a
        connection lost after sending). False only when it surely did not run: Redis answered
        an error, or the connection was never made (redis-py says "connecting")."""
        if isinstance(exc, self._redis.exceptions.ResponseError):
            return False
        text = str(exc)
        return not (
            isinstance(exc, self._redis.exceptions.ConnectionError)
            and (" connecting to " in text or text.startswith("Timeout connecting to"))
        )

    def breaker_failure(
        self,
        service: str,
        threshold: int,
        reset_timeout: float,
        age: float = -1.0,
        *,
        reservation: str | None = None,
        view: View | None = None,
        opens: int = 0,
    ) -> tuple[str, float, int, int, int, bool, str, bool, str | None]:
        """Count one failure fleet-wide; ``age``: seconds since the failed attempt began (an
        attempt that began before the last failure counted and failing within
        :data:`FAILOVER_WINDOW` after it is not counted again), -1 for a probe or an attempt of
        unknown start (always counted). ``reservation``: a half-open probe's, which counts only
        while it holds a probe slot. The answer ends with the run of failures it saw (see
        :meth:`breaker_reset_failures`; ``""``: none). ``view``: the caller's view of an opening,
        written back if Redis lost the breaker's state (as for every breaker script but
        :meth:`breaker_share_opening`). ``opens``: the openings the caller had seen (an opening
        in a Redis that lost the state counts on from them; the same for :meth:`breaker_force`
        and :meth:`breaker_share_opening`). The last of the answer: an open breaker's reason
        when it was opened by hand (``""``: with none), else None (see :func:`_hand_of`)."""
        memory_ms = round(max(reset_timeout, FAILURE_MEMORY_MIN) * 1000)
        lease = max(reset_timeout, PROBE_LEASE_MIN)
        answer = self._call(
            "failure",
            _breaker_keys(service),
            [
                self.channel,
                service,
                self.token,
                threshold,
                reset_timeout,
                memory_ms,
                age,
                FAILOVER_WINDOW,
                reservation or "",
                lease,
                *_view_args(view, opens),
            ],
        )
        st, rem, gen, failures, opens, by_me, run = answer[:7]
        ours = bool(answer[7]) if len(answer) > 7 else bool(by_me)  # (see _FAILURE)
        return (
            _s(st),
            float(rem),
            int(gen),
            int(failures),
            int(opens),
            bool(by_me),
            _s(run),
            ours,
            _hand_of(answer, 8),
        )

    def breaker_admit(
        self,
        service: str,
        probes: int,
        reset_timeout: float,
        reservation: str,
        *,
        view: View | None = None,
    ) -> tuple[str, float, int, int, bool, str | None]:
        """Ask for a half-open probe under ``reservation`` (an id drawn for this attempt: its
        end, or its release when the answer is lost, names it). The last of the answer: an
        open breaker's reason when it was opened by hand (see :func:`_hand_of`)."""
        lease = max(reset_timeout, PROBE_LEASE_MIN)
        answer = self._call(
            "admit",
            _breaker_keys(service),
            [self.channel, service, self.token, probes, lease, reservation, *_view_args(view)],
        )
        decision, rem, gen, opens = answer[:4]
        ours = len(answer) > 4 and bool(answer[4])  # an opening this process made (see _ADMIT)
        return _s(decision), float(rem), int(gen), int(opens), ours, _hand_of(answer, 5)

    def breaker_probe_done(
        self,
        service: str,
        needed: int,
        *,
        success: bool,
        reservation: str,
        reset_timeout: float,
        background: bool = False,
        view: View | None = None,
    ) -> tuple[str, float, int, int, str | None]:
        """The half-open probe of ``reservation`` ended (``success``, or neither way: its slot
        is released; an admit whose answer was lost is released so too). Applied once, and
        only in the half-open state the reservation was made in. The last of the answer: an
        open breaker's reason when it was opened by hand (see :func:`_hand_of`)."""
        answer = self._call(
            "probe_done",
            _breaker_keys(service),
            [
                self.channel,
                service,
                self.token,
                needed,
                1 if success else 0,
                reservation,
                max(reset_timeout, PROBE_LEASE_MIN),
                *_view_args(view),
            ],
            background=background,
        )
        st, rem, gen, opens = answer[:4]
        return _s(st), float(rem), int(gen), int(opens), _hand_of(answer, 4)

    def breaker_force(
        self,
        service: str,
        state: str,
        reset_timeout: float,
        *,
        background: bool = False,
        view: View | None = None,
        opens: int = 0,
        hand: str = "",
    ) -> tuple[str, float, int, int, str | None]:
        """Set the shared state to ``state`` by hand, an opening for ``reset_timeout`` seconds,
        ``hand`` the operator's reason (``""``: none); ``state`` ``""``: only read it, writing
        ``view`` back first if Redis lost the breaker's state. The last of the answer: the
        reason of the state in force when it was set by hand (an opening, the half-open state
        after it, a closing; ``""``: with none), None when it was not (failures opened it, a
        probe closed it); for a change, ``hand``."""
        answer = self._call(
            "force",
            _breaker_keys(service),
            [
                self.channel,
                service,
                self.token,
                state,
                reset_timeout,
                *_view_args(view, opens),
                hand,
                changed_by("") if state else "",
            ],
            background=background,
        )
        st, rem, gen, opens = answer[:4]
        return _s(st), float(rem), int(gen), int(opens), _hand_of(answer, 4)

    def breaker_share_opening(
        self,
        service: str,
        remaining: float,
        age: float,
        *,
        background: bool = True,
        opens: int = 0,
        hand: str | None = None,
        alone: str = "",
    ) -> tuple[str, float, int, int, bool, str | None]:
        """On rejoining, or attaching: share the opening this process made on its own while
        Redis did not answer it (or before it shared the breaker: ``remaining`` seconds left,
        made ``age`` seconds ago), unless the shared breaker is open or changed since; the
        shared state, whether this call opened it, and the reason of the state in force when
        it was set by hand (see :func:`_hand_of`). ``hand``: that opening was made by hand
        (``open_breaker``), the operator's reason (``""``: none given); None: by failures. It
        is shared as such: the other processes say it was by hand, and why. ``background``:
        run by the background thread (it handles failures itself); else a failure marks the
        link down and raises :class:`FleetDown`. ``alone``: the opening's name (see
        ``Breaker.alone_id``): Redis keeps it with the opening, and a call sent again for it
        (the answer of the first lost, though it ran) finds it opened by this process."""
        answer = self._call(
            "share_opening",
            _breaker_keys(service),
            [
                self.channel,
                service,
                self.token,
                remaining,
                age,
                *_view_args(None, opens),
                "0" if hand is None else "1",
                hand or "",
                "" if hand is None else changed_by(""),
                alone,
            ],
            background=background,
        )
        st, rem, gen, opens, by_me = answer[:5]
        return _s(st), float(rem), int(gen), int(opens), bool(by_me), _hand_of(answer, 5)

    def breaker_read(
        self, service: str, *, background: bool = False, view: View | None = None
    ) -> tuple[str, float, int, int, str | None]:
        """The shared state (``view``: written back first if Redis lost it), and the reason of
        an opening made by hand (see :meth:`breaker_force`)."""
        return self.breaker_force(service, "", 0, background=background, view=view)

    def breaker_reset_failures(self, service: str, run: str) -> None:
        """A success: forget the failures counted while closed, if they are still the ``run``
        this process saw (a run its own failure no longer belongs to is left alone)."""
        keys = _keys(service)
        self._call("reset_failures", [keys.breaker, keys.failures], [run])

    def budget_withdraw(self, budget: Any, pending: list[tuple[int, int]]) -> str | None:
        """Spend one retry of ``budget`` fleet-wide, adding its ``pending`` first attempts.
        ``"ratio"``/``"floor"``: granted; ``""``: spent; None: Redis did not answer (``pending``
        is given back to ``budget`` when the script surely did not run)."""
        try:
            answer = self._budget_call(budget, pending, spend=True)
        except FleetDown as down:
            self._unsent(budget, pending, down)
            return None
        return _s(answer[0])

    def budget_refund(self, budget: Any, paid_by: str, age: float) -> None:
        """Give back to ``budget``'s fleet-wide figures a retry paid for ``age`` seconds ago
        by ``paid_by`` (``"ratio"``/``"floor"``) that never ran. Redis failing: the link is
        marked down as on any failure-path call (its one warning), nothing raised."""
        from ._budget import WINDOW  # noqa: PLC0415 - the budget module imports this one

        key = _keys(budget.service).budget
        args = [paid_by, age, budget.config.retry_budget_floor, WINDOW]
        # (this process's own figures were given back: without Redis it goes on alone)
        with contextlib.suppress(FleetDown):
            self._call("budget_refund", [key], args)

    @staticmethod
    def _unsent(budget: Any, pending: list[tuple[int, int]], down: FleetDown) -> None:
        """A budget script carrying ``pending`` first attempts failed: they are sent again
        later only if it surely did not run. One that timed out may run when Redis resumes
        (a Redis that hung runs what it received): sent again, they would count twice
        fleet-wide, and the fleet's budget would grow by the ratio of attempts never made."""
        if not down.sent:
            budget.give_back(pending)

    def _budget_call(self, budget: Any, pending: list[tuple[int, int]], *, spend: bool) -> Any:
        key = _keys(budget.service).budget
        cfg = budget.config
        from ._budget import WINDOW, whole_retries  # noqa: PLC0415 - it imports this module

        deposit_args = [x for age, amount in pending for x in (age, amount)]
        # the retries this process paid for alone while Redis did not answer (their first
        # attempts are among the deposits): the fleet counts them spent
        alone = budget.take_alone()
        alone_args = [x for age, count in alone for x in (age, count)]
        sent = budget.now()
        try:
            answer = self._call(
                "budget",
                [key],
                [
                    cfg.retry_budget or 0.0,
                    cfg.retry_budget_floor,
                    WINDOW,
                    int(spend),
                    len(alone),
                    *alone_args,
                    *deposit_args,
                ],
            )
        except FleetDown as down:
            if not down.sent:  # (one that may have run is not sent again: see _unsent)
                budget.give_back_alone(alone)
            raise
        ratio = cfg.retry_budget or 0.0
        deposits, spent, tokens = float(answer[1]), int(answer[2]), float(answer[3])
        budget.fleet_figures(
            {
                "first_attempts": round(deposits),
                "retries": spent,
                "floor_tokens": round(tokens, 1),
                "available": whole_retries(ratio * deposits - spent, tokens),
            },
            sent=sent,
            ran=float(answer[4]),
        )
        return answer

    # -- up and down -------------------------------------------------------------------------
    def _refusal(self, exc: BaseException) -> str | None:
        """What Redis meant when it answered ``exc`` (an error reply): a read-only replica,
        out of memory, no permission, or another error. None: it did not answer."""
        errors = self._redis.exceptions
        login = getattr(errors, "AuthenticationError", None)  # (a ConnectionError in redis-py)
        if isinstance(login, type) and isinstance(exc, login):
            return _LOGIN_REFUSED
        if not isinstance(exc, errors.ResponseError):
            return None
        text = str(exc)
        for code, name, meaning in _REFUSALS:
            kind = getattr(errors, name, None)
            if (isinstance(kind, type) and isinstance(exc, kind)) or re.search(
                rf"(?:^|[\s-]){code}\b", text
            ):
                return _acl_refusal(text) if meaning == _ACL_REFUSED else meaning
        if _ACL_WORDS.search(text):
            return _acl_refusal(text)
        if _DB_OUT_OF_RANGE.search(text):
            return _BAD_DB
        if _wrong_type(exc):
            return _WRONG_TYPE
        return "an error reply"

    def mark_down(self, exc: BaseException) -> None:
        said = client_says(exc, self.url)  # e.g. "ConnectionError: Error 111 connecting ..."
        refusal = self._refusal(exc)
        # health()'s problem and the warning say the same: what Redis answered, when it did
        problem = said if refusal is None else f"{refusal} ({said})"
        with self._lock:
            self.up = False
            self.problem = problem
            now = self._clock()
            self._down_at = now
            if self._down_since is None:
                self._down_since = now
            if self._down_warned and now - self._down_logged_at < DOWN_LOG_PERIOD:
                return  # this down period's warning was logged (a new one, after a logged
                # "restored", warns at once: its last line must not say Redis answers)
            self._down_logged_at = now
            self._down_warned = True
            services = self._services_locked()
        if refusal is not None:
            what = f"answered: {problem}"
            until = (
                "it accepts the login"
                if refusal == _LOGIN_REFUSED
                else "its ACL allows them"
                if refusal.startswith(_ACL_REFUSED)
                else "SELF_HEALING_REDIS_URL names a database it has"
                if refusal == _BAD_DB
                else "the key is deleted"
                if refusal == _WRONG_TYPE
                else "it takes writes again"
            )
        else:
            what, until = f"did not answer ({type(exc).__name__})", "it answers again"
        _emit_for_services(
            self.config,
            services,
            logging.WARNING,
            "Shared state unavailable: Redis at %s%s %s; circuit breakers and retry budgets "
            "run on this process's own state until %s",
            self.masked_url,
            _naming(services),
            what,
            until,
            event="shared_state_down",
            redis=self.masked_url,
            error=type(exc).__name__,
            problem=problem,
        )

    def _mark_up(self) -> None:
        """The link's thread has rejoined: the link is up, unless that thread was stopped
        meanwhile (a restart or a close: a thread stopped while it rejoined marked the link up
        after the restart marked it down, before the new thread had subscribed)."""
        with self._lock:
            if not self._current_thread():
                return
            # "restored" answers this down period's "unavailable" line, only when it was logged
            was_down, self._down_warned = self._down_warned, False
            self._down_since = None
            if not was_down:
                self.up = True
                self.problem = None
                return
            services = self._services_locked()
        # the line first, then the link is up: whoever sees it up (health(), a test) finds the
        # line written
        _emit_for_services(
            self.config,
            services,
            logging.INFO,
            "Shared state restored: Redis at %s%s answers again; circuit breakers and retry "
            "budgets are shared with the other processes again",
            self.masked_url,
            _naming(services),
            event="shared_state_restored",
            redis=self.masked_url,
        )
        with self._lock:
            # (not marked down again meanwhile, nor stopped)
            if self._down_since is None and self._current_thread():
                self.up = True
                self.problem = None

    def _current_thread(self) -> bool:
        """Whether the caller is the link's thread of now, not stopped (under ``_lock``)."""
        return threading.current_thread() is self._thread and not self._stop.is_set()

    # -- the background thread ---------------------------------------------------------------
    def _run(self) -> None:
        pubsub: Any = None
        next_flush = 0.0
        next_view_check = 0.0
        heard = 0.0  # when the subscription last delivered something (a message, an answer)
        stop = self._stop
        while not stop.is_set():
            try:
                if pubsub is None:
                    pubsub = self._client.pubsub()
                    self.commands += 1
                    pubsub.subscribe(self.channel)
                    self._subscribed(pubsub)
                    self._rejoin()
                    heard = self._clock()
                    self._first_attempt.set()  # (up: the failure path waiting asks Redis)
                elif not self.up and self._clock() >= self._down_at + RECONNECT_INTERVAL:
                    # a failure-path command failed while the subscription lived (Redis slow,
                    # or refusing writes): at most one attempt per RECONNECT_INTERVAL. The
                    # subscription's connection may have been cut off with it, silently
                    self._check_subscription(pubsub)
                    self._rejoin()
                    heard = self._clock()
                elif self._clock() - heard >= SUBSCRIPTION_CHECK_INTERVAL:
                    self._check_subscription(pubsub)
                    heard = self._clock()
                elif self.up and self._clock() >= next_view_check:
                    next_view_check = self._clock() + VIEW_CHECK_INTERVAL
                    if self._check_views(pubsub):
                        heard = self._clock()
                if self._reports_pending and self.up:
                    self._report_pending()
                if self._timelines_out and self.up:
                    self._send_timelines()
                message = pubsub.get_message(timeout=_TICK)
                while message is not None and not stop.is_set():
                    heard = self._clock()
                    self._on_message(message)
                    message = pubsub.get_message(timeout=0.0)
                now = self._clock()
                if now >= next_flush:
                    next_flush = now + FLUSH_INTERVAL
                    self._flush_budgets()
            except Exception as exc:
                if stop.is_set():
                    break
                self.mark_down(exc)
                self._first_attempt.set()  # (down: the failure path waiting decides alone)
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()
                    pubsub = None
                stop.wait(RECONNECT_INTERVAL)
                with contextlib.suppress(Exception):
                    self._observe_budgets()
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()

    def _subscribed(self, pubsub: Any) -> None:
        """Wait for Redis's answer to the subscription (at most the timeout): a refusal (an ACL
        without the channel) arrives as that answer, not when ``subscribe`` sends it, and a
        link that took it for granted would be up without pub/sub, its failure path refused.
        Raises the refusal, naming the channel, or a timeout."""
        errors = self._redis.exceptions
        deadline = time.monotonic() + self.config.redis_timeout
        while True:
            try:
                message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            except errors.ResponseError as exc:
                raise type(exc)(f"SUBSCRIBE on channel {self.channel} refused: {exc}") from exc
            if message is not None and message.get("type") == "subscribe":
                return
            if time.monotonic() >= deadline:
                raise errors.TimeoutError(
                    f"no answer to SUBSCRIBE within {self.config.redis_timeout:g} s"
                )

    def _check_subscription(self, pubsub: Any) -> None:
        """Subscribe again to the channel on the subscription's connection (a command every
        link's ACL allows, and one of the few a subscribed connection may send): its answer
        must come within the Redis timeout, or :data:`SUBSCRIPTION_ANSWER_MIN` if longer
        (messages arriving meanwhile are taken as usual). Raises a timeout otherwise: the
        connection is dropped, and the background thread subscribes anew and reads the shared
        state (the changes published meanwhile never arrived). Not counted in ``commands``
        (the failure path's and the background work's)."""
        errors = self._redis.exceptions
        pubsub.subscribe(self.channel)
        within = max(self.config.redis_timeout, SUBSCRIPTION_ANSWER_MIN)
        deadline = time.monotonic() + within
        while True:
            try:
                message = pubsub.get_message(timeout=max(0.0, deadline - time.monotonic()))
            except errors.ResponseError as exc:
                raise type(exc)(f"SUBSCRIBE on channel {self.channel} refused: {exc}") from exc
            if message is not None:
                if message.get("type") == "subscribe":
                    return
                self._on_message(message)
            elif time.monotonic() >= deadline:
                raise errors.TimeoutError(f"no answer on the subscription within {within:g} s")

    def _rejoin(self) -> None:
        """Redis answers (a new subscription, or a command): check that it takes writes, report
        and read the shared state, then share again. A Redis that answers but refuses writes
        (a read-only replica after a failover, out of memory, an ACL without the rights)
        raises here and stays down: its failure-path scripts would fail at once."""
        self.commands += 1
        self._scripts["alive"](keys=[f"{PREFIX}:alive"], args=[self.token, self.channel])
        self._read_timelines()
        if self._timelines_out:
            self._send_timelines()
        read = self._resync()
        # a breaker that opened alone while the states were read (a unit's failure, an
        # open(), the link not up yet) kept that opening (see Breaker.fleet_rejoin): shared
        # before the link is up, or its units would be let through by the view the link
        # follows, and the opening stay this process's alone until the next rejoin
        for _ in range(3):
            again = self._resync(read)
            if not again:
                break
            read.update(again)
        self._mark_up()
        # a breaker attached while the states were read (after _resync listed the breakers,
        # before the link was up: another service's factory made meanwhile, or the next of
        # several a reload switches on) found the link down and read nothing itself: read now,
        # or its view stays closed while the fleet's breaker may be open, and its units go to
        # the database the fleet refuses until a later change's message. One attached from
        # now on finds the link up and reads it itself (see sync_breaker). So is one that
        # opened alone in the moment before the link was up
        self._resync(read)

    def _check_views(self, pubsub: Any) -> bool:
        """The background thread, the link up, every :data:`VIEW_CHECK_INTERVAL`: Redis
        still holds the fleet's opening that a view of this process holds, or it gets it
        back. Redis flushed while the links stay up (``FLUSHALL``, ``FLUSHDB``) is heard of by
        no link: without the check the opening came back only at the next failure-path script
        of a process following it, usually the first probe asked for at the opening's end,
        and until then a process started after the flush (its view closed) sent its units to
        the database. For each breaker whose view holds an opening with time left; nothing
        is sent while there is none (closed, or the opening over: an idle service costs
        nothing), and the success path sends nothing.

        One read per check, its answer taken: the view is confirmed, or follows the fleet's
        newer state (a change whose message never came: the subscription dropped without a
        reset). A read finding no state (gen 0) writes nothing: the view is written back only
        once the subscription has answered a check sent after that read (every message
        published before it, a close or an opening that made the view stale included, has
        been taken then), with a second read carrying the view (see ``restore_view`` in the
        scripts: it writes only into a Redis that has no state for the breaker). A
        subscription that does not answer raises (the link goes down and rejoins), and the
        view, not confirmed, is not written back on rejoining (see :data:`VIEW_FRESH`). True
        when the subscription was checked.

        A read that gets no answer within the Redis timeout does not take the link down (a
        Redis stalling for a moment while nothing fails is no outage, as for the
        subscription's check, which decides that); any other failure of the store raises
        (the link goes down, and its rejoin reads the state)."""
        with self._lock:
            breakers = list(self.breakers.items())
        timeout = self._redis.exceptions.TimeoutError
        lost = []
        for service, breaker in breakers:
            if not breaker.holds_opening():
                continue
            try:
                answer = self.breaker_read(service, background=True)
            except timeout:
                continue
            if answer[2] != 0:
                self._take(service, breaker, answer)
            else:  # no script of this process carries the view until it is confirmed again
                breaker.doubt_view()
                lost.append((service, breaker))
        if not lost:
            return False
        # Redis has no state for them: written back only once the subscription has answered
        self._check_subscription(pubsub)
        for service, breaker in lost:
            breaker.confirm_view()
            view = breaker.lost_view(proven=True)
            if view is not None:
                with contextlib.suppress(timeout):
                    # (its answer not taken: it comes back by its message, as every change)
                    self.breaker_read(service, background=True, view=view)
        return True

    def _take(
        self, service: str, breaker: Any, answer: tuple[str, float, int, int, str | None]
    ) -> None:
        """The background thread's read of ``service``'s state, taken into its view (a
        listener of the application's that raises is said as such, the link staying up)."""
        state, remaining, gen, opens, hand = answer
        try:
            breaker.fleet_update(state, remaining, gen, opens, answer=True, hand=hand, read=True)
        except Exception as exc:
            self._listener_failed(service, exc)

    #: set when a breaker has probe ends to report while the link is up (see report_soon)
    _reports_pending = False

    def report_soon(self) -> None:
        """A breaker remembered a probe's end, or an admit's release, that an interruption cut
        off while the link was up (see ``Breaker.report_probes``): the background thread
        reports it at its next tick, not only when it rejoins."""
        self._reports_pending = True

    def _report_pending(self) -> None:
        """The background thread, the link up: report what :meth:`report_soon` asked for
        (raises what the store raises: the link goes down, and its rejoin reports it)."""
        self._reports_pending = False
        with self._lock:
            breakers = list(self.breakers.values())
        for breaker in breakers:
            breaker.report_probes(self)

    def _resync(self, done: dict[int, str] | None = None) -> dict[int, str]:
        """Report the probe outcomes Redis missed, then read every attached breaker's shared
        state (on connecting: messages may be lost), sharing an opening it made alone (see
        ``Breaker.fleet_rejoin``), but for those ``done`` names (by id) that have made no
        opening alone since (the name of their last, ``Breaker.alone_id``, unchanged).
        Returns the breakers it handled, by id, with the name each had then."""
        done = done or {}
        with self._lock:
            breakers = [(s, b) for s, b in self.breakers.items() if done.get(id(b)) != b.alone_id]
        handled: dict[int, str] = {}
        for service, breaker in breakers:
            handled[id(breaker)] = breaker.alone_id
            breaker.report_probes(self)
            try:
                handled[id(breaker)] = breaker.fleet_rejoin(self)
            except self._redis.exceptions.RedisError:
                raise
            except Exception as exc:  # (a listener's: see _listener_failed)
                self._listener_failed(service, exc)
        return handled

    def _on_message(self, message: Any) -> None:
        if message.get("type") != "message":
            return  # the subscription's own answers
        try:
            data = json.loads(message["data"])
            if "alive" in data and "s" not in data:
                return  # a link's alive check (see _ALIVE)
            if "tl" in data and "s" not in data:  # a cluster's timeline raised (_TIMELINE)
                # (an earlier release's script sends no time: ``since`` unknown)
                # (numbers none of ours: see _timeline_number, _message_number)
                since = (
                    _message_number(data["us"], integer=True) / 1_000_000 if "us" in data else None
                )
                system, server = _shown(data["tl"]), _shown(data["at"])
                self._learn_timeline(system, _timeline_number(data["t"]), server, since)
                return
            service = str(data["s"])
            update = (
                str(data["st"]),
                _message_number(data["r"], least=-_NUMBER_MAX, most=OPENING_MAX),
                # (a generation further ahead than any opening lasts: none of the fleet's, see
                # gen_of in the scripts; this process's clock, not Redis's, is at hand here,
                # and hosts' clocks agree to far better than a day. The scripts' answers are
                # bounded by Redis's: only a process whose clock is a day off takes one)
                int(_message_number(data["g"], integer=True, most=_generation_most())),
                int(_message_number(data["o"], integer=True)),
            )
            mine = data.get("b") == self.token
            # the state was set by hand: the operator's reason. A change made by hand now
            # (``f``: open_breaker, close_breaker; see _FORCE) is said even when the view
            # was in that state already; else (no ``f``) the message tells of the state the
            # operator set before: an opening by hand written back into a Redis that lost it
            # (see restore_view), or shared on rejoining (see _SHARE_OPENING), the half-open
            # state after one (see _ADMIT)
            forced = bool(data.get("f"))
            hand = _shown(data.get("h") or "") if forced or "h" in data else None
            read = hand is not None and not forced
            restored = bool(data.get("w"))  # written back into a Redis that lost it
        except (KeyError, TypeError, ValueError):
            log_quietly(
                _log, logging.DEBUG, "ignoring a message on %s that is not ours", self.channel
            )
            return
        breaker = self.breakers.get(service)
        if breaker is not None:
            reason = _RESTORED_REASON if restored and not mine else None
            try:
                breaker.fleet_update(*update, mine=mine, reason=reason, hand=hand, read=read)
                if restored and mine:
                    breaker.say_restored(update[0], update[1])
            except Exception as exc:
                self._listener_failed(service, exc)

    def _listener_failed(self, service: str, exc: Exception) -> None:
        """A breaker listener of the application raised while a state shared through Redis was
        taken (the view and the local breaker took it before the listeners were told). It is
        not Redis failing: the link stays up and the next messages are taken. The line names
        the error's class, never its text (as for any part of the machinery that fails), and
        is rate-limited per service as theirs are; the hooks see each."""
        log, since = _LISTENER_LINES.take((service, STATE.generation))
        emit(
            self.config,
            log_breaker,
            logging.WARNING,
            "Circuit breaker listener failed: service=%s a listener raised %s on a state change "
            "shared through Redis; the change is taken, Redis stays in use%s",
            service,
            type(exc).__qualname__,
            more_since(since),
            log=log,
            service=service,
            event="machinery_failed",
            part="circuit breaker listener",
            error=type(exc).__qualname__,
            suppressed=since,
        )
        if log and _log.isEnabledFor(logging.DEBUG):
            # its traceback without the texts that may quote values (a listener writing to the
            # database, failing with a unique violation's DETAIL and SQLAlchemy's parameters)
            log_quietly(
                _log, logging.DEBUG, "breaker listener failure detail\n%s", failure_detail(exc)
            )

    def _observe_budgets(self) -> None:
        """Redis is down: look at the budgets' first attempts once a second all the same, so
        each lands in its own second (those older than the window are not sent on rejoining)."""
        with self._lock:
            budgets = list(self.budgets.values())
        for budget in budgets:
            budget.observe()

    def _flush_budgets(self) -> None:
        """Add the first attempts seen since the last flush to the fleet's budgets (one script
        per budget with new ones still within the window; none when there are none)."""
        if not self.up:
            self._observe_budgets()
            return
        with self._lock:
            budgets = list(self.budgets.values())
        for budget in budgets:
            pending = budget.take_pending()
            if not pending and not budget.alone_pending:
                continue
            try:
                self._budget_call(budget, pending, spend=False)
            except FleetDown as down:
                self._unsent(budget, pending, down)
                return

    # -- stopping ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the background thread and drop the connections (nothing attached any more,
        ``reset_state``, exit)."""
        with self._restart_lock:
            self.closed = True
            self._stop_thread(self.config.redis_timeout)

    def _after_fork_in_child(self) -> None:
        """In a forked child: the parent's thread does not exist here and its locks may be held;
        start over with new ones (the parent's sockets are left alone: redis-py opens new
        connections in a new process)."""
        if self.closed:
            return
        self.up = False
        self.token = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._new_locks()
        self._start()


def _emit_for_services(
    config: Config, services: list[str], level: int, msg: str, *args: Any, **fields: Any
) -> None:
    """A link's action (Redis lost, Redis back), about every service of this process using the
    link (``services``, sorted): one line naming them all (``services``; ``service`` too when
    it is one), and one hook event per service, its ``service`` set as every other action's
    (operators filter events, OpenTelemetry's included, by service: an event without one was
    found under none) and ``services`` naming them all. A link no service uses yet: one event
    without a service."""
    named = ", ".join(services)
    one = {"service": services[0]} if len(services) == 1 else {}
    emit_line(config, log_breaker, level, msg, *args, services=named, **one, **fields)
    each: list[str | None] = [*services] or [None]
    for service in each:
        emit(
            config,
            log_breaker,
            level,
            msg,
            *args,
            log=False,
            service=service,
            services=named,
            **fields,
        )


#: why a process follows an opening another process wrote back into a Redis that lost it
_RESTORED_REASON = (
    "Redis lost the shared state (restarted or flushed): the fleet's opening, written back "
    "by another process"
)


def _naming(services: list[str]) -> str:
    """`` (services: billing, orders)``: which services of this process a link's line is about
    (nothing for a link that has none attached)."""
    return f" (services: {', '.join(services)})" if services else ""


def _acl_refusal(text: str) -> str:
    """A refusal by the ACL, naming what was refused when the answer says."""
    for pattern in _REFUSED_WHAT:
        found = pattern.search(text)
        if found:
            what = found[1]
            return f"{_ACL_REFUSED}: {what if ' ' in what else what.upper()}"
    return _ACL_REFUSED


def _hand_of(answer: Any, at: int) -> str | None:
    """Whether a breaker script's ``answer`` says the state it names was set by hand (an
    opening, the half-open state after it, a closing): ``answer[at]`` is ``'1'`` then and
    ``answer[at + 1]`` the operator's reason (``""``: none given), returned; None when it was
    not (failures opened it, a probe closed it), or the answer says nothing of it."""
    if len(answer) > at + 1 and _s(answer[at]) == "1":
        return _shown(answer[at + 1])
    return None


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _shown(value: Any) -> str:
    """Text read from Redis that this process shows (``health()``, the dashboard, ``resilient-db
    breaker status``, log lines, errors): an operator's reason, who made a change, a service
    name, a cluster's key and server. Anything with access to the Redis may have written it,
    of any length: cut to :data:`MAX_VALUE_CHARS`, marked with how many characters were left
    off, so that a huge value does not make every answer as large. (What the library writes
    is far shorter: a reason has at most 200 characters, a host name 100.)"""
    return truncated(_s(value), MAX_VALUE_CHARS)


class _Attached(Protocol):
    """A breaker or a budget, as a link keeps it: by its service name."""

    service: str


def attach(
    config: Config, *, breaker: _Attached | None = None, budget: _Attached | None = None
) -> FleetLink:
    """Attach ``breaker`` or ``budget`` (by its service name) to the link of this process to
    ``config.redis_url``, made, and its thread started, on first use; the link takes ``config``
    (a new timeout restarts it). Looking the link up and attaching are one step, so a link
    that :func:`detach` is closing is never handed out. Raises :class:`ConfigError` when the
    redis package is missing."""
    url = config.redis_url
    assert url is not None
    with STATE.lock:
        link: FleetLink | None = STATE.fleet_links.get(url)
        new = link is None or link.closed
        if link is None or link.closed:  # (both tests again: mypy narrows ``link`` here)
            link = STATE.fleet_links[url] = FleetLink(config, start=False)
        with link._lock:
            if breaker is not None:
                link.breakers[breaker.service] = breaker
            if budget is not None:
                link.budgets[budget.service] = budget
        if new:  # started once attached: its first line names the service
            link.start()
    if link.config != config:
        link.reconfigure(config)  # outside STATE.lock: it waits for the thread to stop
    return link


def detach(
    link: FleetLink, *, breaker: _Attached | None = None, budget: _Attached | None = None
) -> None:
    """Take ``breaker`` or ``budget`` off ``link`` (if still attached there); the link is closed
    when nothing is attached to it any more."""
    with STATE.lock:
        with link._lock:
            for table, owner in ((link.breakers, breaker), (link.budgets, budget)):
                if owner is not None and table.get(service := owner.service) is owner:
                    del table[service]
            unused = not link.breakers and not link.budgets
        if unused and STATE.fleet_links.get(link.url) is link:
            del STATE.fleet_links[link.url]
    if unused:
        link.close()  # outside STATE.lock: it waits for the thread to stop


def follow_users(policies: Iterable[Any]) -> None:
    """Keep on its link only a breaker or budget a live user shares through that Redis.

    ``policies`` are the live users' policies (their ``breaker`` is None while switched off,
    their ``budget`` None without one). A breaker or budget attached to a link whose URL none
    of its users asks for takes one user's configuration (as a factory re-applying it would);
    one that no user has any more (every factory of its service is gone, or the reload
    switched it off in each) leaves Redis for this process's own state, its configuration
    without the URL, so that a factory of its service made later attaches it again. A link
    left with nothing attached is closed (:func:`detach`). Called by ``reload_config()``.
    """
    wanted: dict[int, list[Config]] = {}
    for policy in policies:
        for owner in (policy.breaker, policy.budget):
            if owner is not None:
                wanted.setdefault(id(owner), []).append(policy.config)
    with STATE.lock:
        attached = [
            (link.url, owner)
            for link in STATE.fleet_links.values()
            for owner in (*link.breakers.values(), *link.budgets.values())
        ]
    for url, owner in attached:
        configs = wanted.get(id(owner), [])
        if any(config.redis_url == url for config in configs):
            continue
        owner.apply_config(configs[-1] if configs else owner.config.replace(redis_url=None))


#: every engine's fence (its commit hooks, see ``CommitProtocol.fleet_timeline``), told of
#: each rise of a cluster's timeline any link of this process hears of. Kept by the process,
#: not by a link: a link made later (a reload giving a factory a Redis URL or another one, a
#: breaker switched off then on, ``reset_state``) tells the engines made before it, whose
#: connections it never judged (a connection on an engine's highest timeline is taken
#: without its cluster being judged: such an engine never looked at that link)
_FENCES: weakref.WeakSet[Any] = weakref.WeakSet()
_FENCES_LOCK = threading.Lock()
renew_after_fork(globals(), "_FENCES_LOCK")


def follow_timelines(fence: Any) -> None:
    """``fence`` (an engine's commit hooks) is told, by its ``fleet_timeline``, of each rise
    of a cluster's timeline that any link of this process hears of from now on, whichever
    factory's Redis it is (a cluster's system identifier names it wherever it is heard).
    In memory: no Redis round trip."""
    with _FENCES_LOCK:
        _FENCES.add(fence)


def fleet_timeline(system: str) -> tuple[int, str] | None:
    """The highest timeline of cluster ``system`` that a link of this process heard of from
    its fleet, with the server it was seen at; None when none did. In memory."""
    best: tuple[int, str] | None = None
    for link in tuple(STATE.fleet_links.values()):
        known = link.timelines.get(system)
        if known is not None and (best is None or known[0] > best[0]):
            best = known[0], known[1]
    return best


def share_timeline(system: str, timeline: int, server: str) -> None:
    """This process saw ``timeline`` of cluster ``system`` on a primary at ``server``: shared
    by each live link of this process that does not know it as high (see
    :meth:`FleetLink.share_timeline`; by their threads, no round trip here)."""
    for link in tuple(STATE.fleet_links.values()):
        if not link.closed:
            link.share_timeline(system, timeline, server)


def links() -> dict[str, FleetLink]:
    """Every live link, by masked URL."""
    with STATE.lock:
        return {link.masked_url: link for link in STATE.fleet_links.values()}


def close_links() -> None:
    with STATE.lock:
        found = list(STATE.fleet_links.values())
        STATE.fleet_links.clear()
    for link in found:
        link.close()


def _after_fork_in_child() -> None:
    """Every breaker and budget gets new locks (held by a thread of the parent, maybe: the
    background thread inside a listener, a unit), before any link starts its thread again."""
    owners: dict[int, Any] = {}
    for owner in (*STATE.breakers.values(), *STATE.budgets.values()):
        owners[id(owner)] = owner
    found = list(STATE.fleet_links.values())
    for link in found:
        for owner in (*link.breakers.values(), *link.budgets.values()):
            owners[id(owner)] = owner
    for owner in owners.values():
        owner.after_fork_in_child()
    for link in found:
        link._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(close_links)


# -- the operator's command (``resilient-db breaker``): one Redis, no link, no breaker --------
def operator_client(url: str, timeout: float) -> Any:
    """A client of ``url`` for one command of an operator's: ``timeout`` on every socket, no
    retries of the client's own (raises :class:`ConfigError` without the redis package)."""
    redis = _import_redis()
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0),
        health_check_interval=0,
    )


def changed_by(what: str) -> str:
    """Who makes a change by hand, as ``resilient-db breaker status`` says it (``by``):
    ``what`` (``"resilient-db breaker"``: the command; ``""``: a process of the fleet,
    ``open_breaker()``), this process's pid and its host's name."""
    host = socket.gethostname()[:_HOST_MAX] or "an unnamed host"
    where = f"pid {os.getpid()} on {host}"
    return f"{what}, {where}" if what else where


#: the longest host name a change by hand records (``changed_by``)
_HOST_MAX = 100


def operator_force(
    client: Any, service: str, *, state: str, seconds: float, reason: str, token: str
) -> bool:
    """Open (for ``seconds``) or close ``service``'s shared breaker by hand with ``reason``:
    the script ``open_breaker()`` runs (``_FORCE``), published on the channel of the client's
    database, so that every process sharing the breaker takes it as made by hand in another
    process. ``token`` names the command in the message (no process has it: none takes the
    change for its own). Raises what the client raises. True when Redis had a record of the
    breaker before (a process shared it, or a command changed it: else the name may be a
    typo)."""
    keys = _breaker_keys(service)
    known = bool(client.exists(keys[0]))
    channel = CHANNEL.format(db=client.get_connection_kwargs().get("db") or 0)
    who = changed_by("resilient-db breaker")
    client.register_script(_FORCE)(
        keys=keys,
        args=[channel, service, token, state, seconds, *_view_args(None), reason, who],
    )
    return known


def operator_records(client: Any, service: str | None) -> list[dict[str, Any]]:
    """What Redis records of ``service``'s shared breaker (None: of every service it has a
    record of, by name), read only: ``service``, ``recorded`` (False: no record, the breaker
    closed as far as the fleet knows), ``state`` (``open`` whose time is over is
    ``half-open``: what the next call meets, as ``health()`` says), ``since`` (Redis time of
    its last change, seconds since the epoch; None without a record), ``open_until`` and
    ``seconds_left`` (while open), ``by_hand``, ``reason`` and ``by`` (the state in force was
    set by hand: an opening, the half-open state after it, or a closing; why, and who made
    the change: the command or a process, its pid and host; False, None and None when
    failures opened it or probes closed it) and ``fleet_opens``. A number of the record that
    no process of the fleet writes (see :func:`_record_number`) is read as the scripts read it,
    as missing (an end: the opening is over; a generation: no ``since``; openings: None), and
    named, with its value (cut), in ``unreadable``; a record that is no hash (another client's
    value under its key) is ``state`` ``unreadable``, why in ``unreadable``."""
    if service is None:
        head, tail = f"{PREFIX}:{{", "}:breaker"
        names = sorted(
            {
                key[len(head) : -len(tail)]
                for key in map(_s, client.scan_iter(match=f"{head}*{tail}", count=1000))
                if key.startswith(head) and key.endswith(tail)
            }
        )
    else:
        names = [service]
    seconds, micros = client.time()
    now = float(seconds) + float(micros) / 1_000_000
    records = []
    for name in names:
        fields = ("st", "until", "gen", "opens", "hand", "why", "hclose", "who")
        try:
            raw = client.hmget(_keys(name).breaker, *fields)
        except Exception as exc:
            if not _wrong_type(exc):
                raise
            records.append(_unreadable_record(name))
            continue
        st, until, gen, opens, hand, why, hclose, who = (None if v is None else _s(v) for v in raw)
        unreadable: dict[str, str] = {}
        numbers: dict[str, float | None] = {}
        for field, text, integer in (
            ("gen", gen, True),
            ("opens", opens, True),
            ("until", until, False),
        ):
            numbers[field] = _record_number(text, integer=integer)
            if text is not None and numbers[field] is None:
                unreadable[field] = _shown_number(text)
        generation, fleet_opens, end_at = numbers["gen"], numbers["opens"], numbers["until"]
        if generation is not None and gen is not None and generation > _generation_most(now):
            # (further ahead than any opening lasts: read as missing, see gen_of)
            generation = None
            unreadable["gen"] = _shown_number(gen)
        if end_at is not None and until is not None and end_at > now + OPENING_MAX:
            # (further off than any opening lasts: read as missing, see opening_end)
            end_at = None
            unreadable["until"] = _shown_number(until)
        record = _operator_record(
            name,
            recorded=gen is not None,
            state=_shown(st or "closed"),
            since=None if generation is None else generation / 1_000_000,
            fleet_opens=None if "opens" in unreadable else int(fleet_opens or 0),
        )
        if unreadable:
            record["unreadable"] = unreadable
        if record["state"] == "open":
            end = now if end_at is None else end_at
            if end > now:
                record["open_until"] = end
                record["seconds_left"] = round(end - now, 3)
            else:
                record["state"] = "half-open"
        # (a closing by hand is the last change while 'hclose' is its generation: see
        # closed_hand in the scripts)
        closed = record["state"] == "closed"
        if (hand == "1" and not closed) or (closed and hclose is not None and hclose == gen):
            record["by_hand"] = True
            record["reason"] = _shown(why) if why else None
            record["by"] = _shown(who) if who else None
        records.append(record)
    return records


#: Redis times, generations and counts of a breaker's record are below this (2^53: exact in
#: a double); the scripts read any other value as missing (see ``num`` in the scripts)
_NUMBER_MAX = 2**53


def _generation_most(now: float | None = None) -> float:
    """The greatest generation (microseconds) of the fleet's at ``now`` (seconds since the
    epoch; None: this process's clock): a change's is its Redis time (or one more than the
    last's), so one further ahead than any opening lasts (:data:`OPENING_MAX`) is none of
    the fleet's (see ``gen_of`` in the scripts). Taken, a planted one (2^53 - 2, ten years
    ahead) made every later change of the breaker look older, ignored by every process that
    had taken it until it restarted."""
    return ((time.time() if now is None else now) + OPENING_MAX) * 1_000_000


def _record_number(text: str | None, *, integer: bool) -> float | None:
    """A number of a breaker's record as the scripts read it (``num``, ``count``): None when
    missing, or not one a process of the fleet writes (thousands of digits, negative, nan,
    inf, not an integer where a count is, no number at all)."""
    if text is None:
        return None
    try:
        value = _message_number(text, integer=integer)
    except ValueError:
        return None
    return int(value) if integer else value


def _message_number(
    value: Any, *, integer: bool = False, least: float = 0, most: float = _NUMBER_MAX
) -> float:
    """A number of a breaker's message (see ``publish`` in the scripts): as the scripts write
    them, finite, from ``least`` (0: not negative) to 2^53 (or to ``most``: a time left, to
    :data:`OPENING_MAX`; a generation, to :func:`_generation_most`). Raises ValueError for
    another (a message of another client's: a generation of 30 digits, or ten years ahead,
    taken, made every later change of the breaker look older and ignored; a time left of
    inf, or of 10^12 s, opened it for good)."""
    text = str(value)
    number = float(text) if len(text) <= 40 else math.inf  # (float() takes thousands of digits)
    if (
        not (least <= number < _NUMBER_MAX)
        or number > most
        or (integer and not number.is_integer())
    ):
        raise ValueError(f"not a number of the library's: {truncated(text, 40)!r}")
    return number


def _shown_number(text: str) -> str:
    """A number none of ours, as ``unreadable`` shows it: its first characters."""
    return truncated(text, 40)


def _wrong_type(exc: BaseException) -> bool:
    """Whether Redis refused a command on a key that holds another type of value than the
    command's (a string where a hash is, say): written by another client."""
    return "WRONGTYPE" in str(exc)


def _wrong_type_text(keys: list[str]) -> str:
    """What a link says of a command refused with WRONGTYPE on one of ``keys`` (Redis's
    answer does not say which; TYPE is no command the library's ACL needs)."""
    named = ", ".join(keys)
    which = f"key {named}" if len(keys) == 1 else f"one of the keys {named}"
    # (keys first: the problem's text is cut to a few hundred characters, see client_says)
    return f"WRONGTYPE: {which} holds a value of another type than the library's"


def _operator_record(
    name: str, *, recorded: bool, state: str, since: float | None, fleet_opens: int | None
) -> dict[str, Any]:
    """A record of :func:`operator_records`, neither open until a time nor set by hand."""
    return {
        "service": _shown(name),
        "recorded": recorded,
        "state": state,
        "since": since,
        "open_until": None,
        "seconds_left": None,
        "by_hand": False,
        "reason": None,
        "by": None,
        "fleet_opens": fleet_opens,
    }


def _unreadable_record(name: str) -> dict[str, Any]:
    """``resilient-db breaker status``'s record of a breaker whose key holds no hash."""
    record = _operator_record(name, recorded=True, state="unreadable", since=None, fleet_opens=None)
    record["unreadable"] = {
        "key": "holds another type of value than a hash (WRONGTYPE): not this library's"
    }
    return record


def operator_timelines(client: Any) -> list[dict[str, Any]]:
    """What Redis records of the fleet's timelines (see :data:`TIMELINES_KEY`), read only,
    by cluster: ``system_identifier``, ``timeline`` (a primary of that cluster on a lower
    one is refused by the fleet's processes), ``server`` (where a process saw it) and
    ``since`` (Redis time it was recorded, seconds since the epoch). An entry not of this
    library's making is left out; a key that holds no hash is one entry of None values but
    ``unreadable``, why."""
    timelines = []
    try:
        found = client.hgetall(TIMELINES_KEY).items()
    except Exception as exc:
        if not _wrong_type(exc):
            raise
        return [
            {
                "system_identifier": None,
                "timeline": None,
                "server": None,
                "since": None,
                "unreadable": {"key": _wrong_type_text([TIMELINES_KEY])},
            }
        ]
    for system, value in sorted((_shown(k), _s(v)) for k, v in found):
        entry = _timeline_entry(value)
        if entry is not None:
            timeline, since, server = entry
            timelines.append(
                {
                    "system_identifier": system,
                    "timeline": timeline,
                    "server": server or None,
                    "since": since,
                }
            )
    return timelines


def _timeline_entry(value: str) -> tuple[int, float, str] | None:
    """A cluster's entry of :data:`TIMELINES_KEY` (``"<timeline> <Redis time, µs> <server>"``,
    see ``_TIMELINE``): its timeline, when it was recorded (seconds since the epoch) and the
    server it was seen at (``""``: not said); None for a value not of this library's making."""
    timeline, _, rest = value.partition(" ")
    micros, _, server = rest.partition(" ")
    # (a number of thousands of digits is none of ours, and int() refuses it: ValueError)
    if not (timeline.isdigit() and micros.isdigit()) or len(timeline) + len(micros) > 40:
        return None
    try:
        return _timeline_number(timeline), int(micros) / 1_000_000, _shown(server)
    except ValueError:
        return None


#: the highest timeline of a PostgreSQL cluster (``TimeLineID`` is 32-bit)
_MAX_TIMELINE = 2**32 - 1


def _timeline_number(value: Any) -> int:
    """A cluster's timeline read from Redis (an entry, a message): ValueError for one no
    PostgreSQL has (past 32 bits, thousands of digits: none of ours). Taken, every engine
    reaching that cluster refused its primary as an old one, on a lower timeline."""
    text = str(value)
    timeline = int(text) if len(text) <= 10 and text.isdigit() else 0
    if not 1 <= timeline <= _MAX_TIMELINE:
        raise ValueError(f"no timeline of PostgreSQL's: {truncated(text, 40)!r}")
    return timeline


#: a bounded table's value (see ``_bounded_put``)
_Value = TypeVar("_Value")


def _bounded_put(table: dict[str, _Value], key: str, value: _Value) -> None:
    """``table[key] = value``, the oldest key forgotten first when a new key would make
    ``table`` hold more than :data:`MAX_TIMELINES` (a fleet reaches a few clusters)."""
    if key not in table and len(table) >= MAX_TIMELINES:
        del table[next(iter(table))]
    table[key] = value
