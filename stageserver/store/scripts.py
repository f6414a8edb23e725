"""The Lua scripts, each on the keys of one stage or of one principal, which share a hash
tag, and so one slot of a Redis Cluster (tests/test_store_slots.py).

A stage's scripts take its keys in the order of ``keys.StageKeys``: its hash, log, text
and lease. The admission (``ADMIT``) takes a principal's limits, in the order of
``keys.LimitKeys``. Entry ids and the text checkpoint: see entries.py. The running index
(``ss:running``) is never named here: it is a key of its own, in a slot of its own,
written beside the scripts (takeover.py, flusher.py).

Each script's arguments are a ``NamedTuple``, which both sides read: Python builds one,
and the script opens with its fields as locals, in their order (``_named``): ``local
token, lease_ms, epoch, ... = unpack(ARGV, 1, n)``. What comes after them, a list of any
length, starts at ``ARGV[rest]``. Every value reaches Lua as a string; ``''`` means none.
"""

from __future__ import annotations

from typing import NamedTuple

from .batch import Script


def _named(fields: tuple[str, ...]) -> str:
    """The Lua that names a script's arguments: ``fields`` as locals, read from ``ARGV``
    in their order; ``rest``, the index of the first value after them."""
    return (
        f"local {', '.join(fields)} = unpack(ARGV, 1, {len(fields)})\n"
        f"local rest = {len(fields) + 1}\n"
    )


# How many events the log holds: its last entry's id says (entries.py); nil when it has
# no entry.
_EVENTS_IN_LOG = """
local function events_in_log()
  local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if top[1] then return tonumber(string.match(top[1][1], '%d+$')) end
  return nil
end
"""

# Take the lease back for the stage instance ``token`` when it lapsed and nobody took the
# stage meanwhile (its status still running, its epoch still this owner's); -1 when
# another holds it, or it ended; 2 when the store lost the stage (the writer then sends it
# whole). ``hold``: the lease for ``token``, as a renewal and a write both need it: 0 when
# ``token`` holds it already, -1 when another does, else ``take_back``'s answer.
_TAKE_BACK = """
local function take_back(token, lease_ms, epoch)
  local state = redis.call('HMGET', KEYS[1], 'status', 'epoch')
  if state[1] and state[1] ~= 'running' then return -1 end
  if state[2] and tonumber(state[2]) ~= tonumber(epoch) then return -1 end
  redis.call('SET', KEYS[4], token, 'PX', lease_ms)
  redis.call('HDEL', KEYS[1], 'suspect_since')
  if not state[1] then return 2 end
  return 1
end

local function hold(token, lease_ms, epoch)
  local live = redis.call('GET', KEYS[4])
  if live == token then return 0 end
  if live then return -1 end
  return take_back(token, lease_ms, epoch)
end
"""


def _fenced(fields: tuple[str, ...], body: str) -> Script:
    """A script of the stage's owner, fenced by its lease: its arguments ``fields``
    (``token``, ``lease_ms`` and ``epoch`` among them) named, ``events_in_log`` and
    ``take_back`` defined, then ``body``, with ``lease``: what ``hold`` answered."""
    return Script(
        _named(fields)
        + _EVENTS_IN_LOG
        + _TAKE_BACK
        + "local lease = hold(token, lease_ms, epoch)\n"
        + body
    )


class ClaimArgs(NamedTuple):
    token: str  # the stage instance (``Stage.instance``)
    lease_ms: int
    hash_ttl_ms: int
    log_ttl_ms: int
    # then the hash's fields and values


# Make a stage the one live stage with its key, everywhere: its lease, a fresh hash of
# its record, its log, begun with the first epoch's marker, and an empty checkpoint of
# its text (entries.py). All four keys exist while it runs: while a slot migrates, Redis
# answers TRYAGAIN to a script that names a key it cannot find, until the slot has
# moved, longer than a lease may take. 1: claimed; 0: a stage with this key runs.
CLAIM = Script(
    _named(ClaimArgs._fields)
    + """
if not redis.call('SET', KEYS[4], token, 'NX', 'PX', lease_ms) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], unpack(ARGV, rest))
redis.call('PEXPIRE', KEYS[1], hash_ttl_ms)
redis.call('XADD', KEYS[2], '1-0', 'm', '1')
redis.call('PEXPIRE', KEYS[2], log_ttl_ms)
redis.call('SET', KEYS[3], '0:0:', 'PX', log_ttl_ms)
return 1
"""
)


class RenewArgs(NamedTuple):
    token: str
    lease_ms: int
    epoch: int
    hash_ttl_ms: str  # '': not now
    log_ttl_ms: str
    checkpoint: str  # '': none
    held: int  # the events the owner knows Redis holds


# The lease keeper's renewal of one stage. The TTLs are refreshed every few seconds, not
# with every renewal; a checkpoint replaces an older one only. {n}: the log holds only n
# events (a failover lost the last writes): the owner writes them again. Else as the
# take-back.
RENEW = _fenced(
    RenewArgs._fields,
    """
if lease == 0 then
  redis.call('PEXPIRE', KEYS[4], lease_ms)
elseif lease ~= 1 then
  return lease
end
if hash_ttl_ms ~= '' then
  redis.call('PEXPIRE', KEYS[1], hash_ttl_ms)
  redis.call('PEXPIRE', KEYS[2], log_ttl_ms)
  redis.call('PEXPIRE', KEYS[3], log_ttl_ms)
end
local have = events_in_log()
if have and have < tonumber(held) then return {have} end
if checkpoint ~= '' then
  local saved = redis.call('GET', KEYS[3])
  if not saved or tonumber(string.match(saved, '^%d+')) < tonumber(string.match(checkpoint, '^%d+'))
  then
    redis.call('SET', KEYS[3], checkpoint, 'PX', log_ttl_ms)
  end
end
return 1
""",
)


class WriteArgs(NamedTuple):
    token: str
    lease_ms: int
    epoch: int
    held: int | str  # the events Redis should hold; '': no doubt, not read
    maxlen: int
    finished: int  # 0 or 1
    ttl_ms: int
    event_ttl_ms: int
    status: str
    summary: str  # '': unchanged
    checkpoint: str  # '': none
    gap: str  # '': none
    owner: str
    prompt_tokens: int
    answer: str  # '': not yet
    # then per entry: its id, its number of values, and the values


# The fenced write, for what a plain XADD cannot carry (flusher.py): a stage's end, its
# summary, a write after any doubt (an error, a restart), and the whole stage when the
# store lost it. After a doubt it reads the log first, and writes only if it holds the
# events this worker believes it does.
# 1: written; -1: fenced; -2: the store lost the stage; {n}: it holds n events, not that.
WRITE = _fenced(
    WriteArgs._fields,
    """
if lease == -1 then return -1 end
if lease == 2 and summary == '' then return -2 end
if held ~= '' then
  local have = events_in_log() or 0
  if have ~= tonumber(held) then return {have} end
end
local i = rest
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  local xadd = {'XADD', KEYS[2], 'MAXLEN', '~', maxlen, ARGV[i]}
  -- Unread, the log must be there: none means the store lost it (read, it is made).
  if held == '' then table.insert(xadd, 3, 'NOMKSTREAM') end
  for j = i + 2, i + 1 + n do table.insert(xadd, ARGV[j]) end
  if not redis.call(unpack(xadd)) then return -2 end
  i = i + 2 + n
end
if checkpoint ~= '' then redis.call('SET', KEYS[3], checkpoint) end
local fields = {}
if summary ~= '' then
  fields = {'status', status, 'summary', summary, 'owner', owner,
            'prompt_tokens', prompt_tokens, 'epoch', epoch}
end
if gap ~= '' then table.insert(fields, 'gap'); table.insert(fields, gap) end
if answer ~= '' then table.insert(fields, 'answer'); table.insert(fields, answer) end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if finished == '1' then
  redis.call('DEL', KEYS[4], KEYS[3])
  redis.call('PEXPIRE', KEYS[1], ttl_ms)
  redis.call('PEXPIRE', KEYS[2], event_ttl_ms)
else
  redis.call('PEXPIRE', KEYS[4], lease_ms)
  redis.call('PEXPIRE', KEYS[1], tonumber(ttl_ms) + tonumber(lease_ms))
  redis.call('PEXPIRE', KEYS[2], tonumber(event_ttl_ms) + tonumber(lease_ms))
  redis.call('PEXPIRE', KEYS[3], tonumber(event_ttl_ms) + tonumber(lease_ms))
end
return 1
""",
)


class HandOffArgs(NamedTuple):
    token: str


# Let a drained stage go, for any worker to take over at once. 1: let go; 0: not this
# instance's.
HAND_OFF = Script(
    _named(HandOffArgs._fields)
    + """
if redis.call('GET', KEYS[4]) ~= token then return 0 end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[1], 'handoff', '1')
return 1
"""
)


class TakeOverArgs(NamedTuple):
    token: str  # the taker's new stage instance
    lease_ms: int
    now_ms: int
    grace_ms: int
    log_ttl_ms: int


# Claim a running stage whose lease has lapsed, under a new lease and the next epoch,
# whose marker entry fences the old owner (entries.py). The first look only marks it
# ``suspect_since``; it is claimed once it has stayed so for the grace (the time an
# owner that was only cut off from Redis has to take its lease back once Redis answers),
# or at once when its worker handed it off. nil when it is not to be taken now (its lease
# is held, it is in its grace); 0 when it is not running (to drop from the running
# index); else its epoch, the events its log holds, its record, owner, whether it was
# handed off, and summary.
TAKE_OVER = Script(
    _named(TakeOverArgs._fields)
    + _EVENTS_IN_LOG
    + """
if redis.call('EXISTS', KEYS[4]) == 1 then return nil end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local fields = redis.call('HMGET', KEYS[1], 'record', 'owner', 'handoff', 'summary',
                          'suspect_since')
if not fields[3] then
  if not fields[5] then
    redis.call('HSET', KEYS[1], 'suspect_since', now_ms)
    return nil
  end
  if tonumber(now_ms) - tonumber(fields[5]) < tonumber(grace_ms) then return nil end
end
redis.call('SET', KEYS[4], token, 'PX', lease_ms)
redis.call('HDEL', KEYS[1], 'suspect_since', 'handoff')
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local have = events_in_log() or 0
redis.call('XADD', KEYS[2], epoch .. '-' .. have, 'm', '1')
redis.call('PEXPIRE', KEYS[2], log_ttl_ms)
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], '0:0:', 'PX', log_ttl_ms) end
return {epoch, have, fields[1] or '', fields[2] or '', fields[3] or '', fields[4] or '{}'}
"""
)


class DeclareDeadArgs(NamedTuple):
    held: int  # the events the log holds
    summary: str
    ttl_ms: int
    event_ttl_ms: int
    answer: str
    # then the ending's events


# End a stage whose owner died, for everyone, when nobody takes it over (takeover.py):
# its ending events in one entry of the next epoch, which fences the dead owner should
# it come back. 1 if ended here; 0 if anything changed meanwhile.
DECLARE_DEAD = Script(
    _named(DeclareDeadArgs._fields)
    + _EVENTS_IN_LOG
    + """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local have = events_in_log() or 0
if have ~= tonumber(held) then return 0 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local entry = {}
for i = rest, #ARGV do
  table.insert(entry, tostring(have + i - rest))
  table.insert(entry, ARGV[i])
end
table.insert(entry, 't')
table.insert(entry, '1')
redis.call('XADD', KEYS[2], epoch .. '-' .. (have + #ARGV - rest + 1), unpack(entry))
redis.call('HSET', KEYS[1], 'status', 'error', 'summary', summary, 'answer', answer)
redis.call('HDEL', KEYS[1], 'suspect_since')
redis.call('DEL', KEYS[3])
redis.call('PEXPIRE', KEYS[1], ttl_ms)
redis.call('PEXPIRE', KEYS[2], event_ttl_ms)
return 1
"""
)


class AdmitArgs(NamedTuple):
    now_ms: int
    token: str  # the stage instance: its member of the stream slots
    lease_ms: int
    max_streams: int  # 0: no limit, as for the two below
    requests_per_minute: int
    tokens_per_minute: int
    window_seconds: int


# Admit a stage of a principal (policy/shared_limits.py; policy/limits.py says what each
# limit means): check every limit, and only then take a stream slot (a lease, renewed
# with the worker's leases) and count the request, so that two hosts cannot both take
# the last slot. The requests and tokens are counted per second, in a hash. {limit
# refused or '', seconds to wait}.
ADMIT = Script(
    _named(AdmitArgs._fields)
    + """
local now = tonumber(now_ms)
local second = math.floor(now / 1000)
local window = tonumber(window_seconds)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if tonumber(max_streams) > 0 and redis.call('ZCARD', KEYS[1]) >= tonumber(max_streams) then
  return {'max_streams', 1}
end
local function wait(key, limit)
  local fields = redis.call('HGETALL', key)
  local live, stale, total = {}, {}, 0
  for i = 1, #fields, 2 do
    local s, n = tonumber(fields[i]), tonumber(fields[i + 1])
    if s <= second - window then
      table.insert(stale, fields[i])
    else
      total = total + n
      table.insert(live, {s, n})
    end
  end
  if #stale > 0 then redis.call('HDEL', key, unpack(stale)) end
  if total < limit then return 0 end
  table.sort(live, function(a, b) return a[1] < b[1] end)
  for _, bucket in ipairs(live) do
    total = total - bucket[2]
    if total < limit then return bucket[1] + window - second end
  end
  return window
end
local per_minute = {{'requests_per_minute', KEYS[2], requests_per_minute},
                    {'tokens_per_minute', KEYS[3], tokens_per_minute}}
for _, counted in ipairs(per_minute) do
  local limit = tonumber(counted[3])
  if limit > 0 then
    local seconds = wait(counted[2], limit)
    if seconds > 0 then return {counted[1], seconds} end
  end
end
redis.call('ZADD', KEYS[1], now + tonumber(lease_ms), token)
redis.call('PEXPIRE', KEYS[1], tonumber(lease_ms) * 2)
redis.call('HINCRBY', KEYS[2], second, 1)
redis.call('EXPIRE', KEYS[2], window + 1)
return {'', 0}
"""
)

#: Every script, for the batcher to load where a node lacks one.
ALL = (CLAIM, RENEW, WRITE, HAND_OFF, TAKE_OVER, DECLARE_DEAD, ADMIT)
