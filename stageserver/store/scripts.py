"""The Lua scripts on a stage's keys: each touches the keys of one stage only, which share
its hash tag, and so one slot of a Redis Cluster (tests/test_store_slots.py). Their
keys are always, in this order, the stage's hash, log, text and lease
(``keys.StageKeys``). Entry ids and the text checkpoint: see entries.py.

The running index (``ss:running``) is never named here: it is a key of its own, in a
slot of its own, written beside the scripts (mirror.py).
"""

from __future__ import annotations

from .batch import Script

# How many events the log holds: its last entry's id says (entries.py); nil when it has
# no entry.
_HELD = """
local function held()
  local top = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  if top[1] then return tonumber(string.match(top[1][1], '%d+$')) end
  return nil
end
"""

# Take the lease back when it lapsed and nobody took the stage meanwhile (its status
# still running, its epoch still this owner's); -1 when another holds it, or it ended;
# 2 when the store lost the stage (the writer then sends it whole). ARGV[1] is the stage
# instance's token, ARGV[2] the lease in ms, ARGV[3] the epoch.
_TAKE_BACK = """
local function take_back()
  local state = redis.call('HMGET', KEYS[1], 'status', 'epoch')
  if state[1] and state[1] ~= 'running' then return -1 end
  if state[2] and tonumber(state[2]) ~= tonumber(ARGV[3]) then return -1 end
  redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
  redis.call('HDEL', KEYS[1], 'suspect_since')
  if not state[1] then return 2 end
  return 1
end
"""

# Make a stage the one live stage with its key, everywhere: its lease, a fresh hash of
# its record, its log, begun with the first epoch's marker, and an empty checkpoint of
# its text (entries.py). All four keys exist while it runs: while a slot migrates, Redis
# answers TRYAGAIN to a script that names a key it cannot find, until the slot has
# moved, longer than a lease may take. ARGV:
# token, lease_ms, hash TTL in ms, log TTL in ms, then the hash's fields and values.
# 1: claimed; 0: a stage with this key runs.
CLAIM = Script("""
if not redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2]) then return 0 end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('XADD', KEYS[2], '1-0', 'm', '1')
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], '0:0:', 'PX', ARGV[4])
return 1
""")

# The lease keeper's renewal of one stage. ARGV: token, lease_ms, epoch, hash TTL in ms
# ("": not now), log TTL in ms, checkpoint ("": none), the events the owner knows Redis
# holds. The TTLs are refreshed every few seconds, not with every renewal; a checkpoint
# replaces an older one only. {n}: the log holds only n events (a failover lost the
# last writes): the owner writes them again. Else as the take-back.
RENEW = Script(
    _HELD
    + _TAKE_BACK
    + """
local live = redis.call('GET', KEYS[4])
if live == ARGV[1] then
  redis.call('PEXPIRE', KEYS[4], ARGV[2])
elseif live then
  return -1
else
  local taken = take_back()
  if taken ~= 1 then return taken end
end
if ARGV[4] ~= '' then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
end
local have = held()
if have and have < tonumber(ARGV[7]) then return {have} end
if ARGV[6] ~= '' then
  local saved = redis.call('GET', KEYS[3])
  if not saved or tonumber(string.match(saved, '^%d+')) < tonumber(string.match(ARGV[6], '^%d+'))
  then
    redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[5])
  end
end
return 1
"""
)

# The fenced write, for what a plain XADD cannot carry (mirror.py): a stage's end, its
# summary, a write after any doubt (an error, a restart), and the whole stage when the
# store lost it. After a doubt it reads the log first, and writes only if it holds the
# events this worker believes it does. ARGV: token, lease_ms, epoch, events Redis
# should hold ("": no doubt, not read), maxlen, finished (0/1), ttl_ms, event_ttl_ms,
# status, summary (""), checkpoint (""), gap (""), owner, prompt tokens, answer (""),
# then per entry: its id, its number of values, and the values.
# 1: written; -1: fenced; -2: the store lost the stage; {n}: it holds n events, not that.
WRITE = Script(
    _HELD
    + _TAKE_BACK
    + """
local live = redis.call('GET', KEYS[4])
if live ~= ARGV[1] then
  if live then return -1 end
  local taken = take_back()
  if taken == -1 then return -1 end
  if taken == 2 and ARGV[10] == '' then return -2 end
end
if ARGV[4] ~= '' then
  local have = held() or 0
  if have ~= tonumber(ARGV[4]) then return {have} end
end
local i = 16
while i <= #ARGV do
  local n = tonumber(ARGV[i + 1])
  local xadd = {'XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], ARGV[i]}
  -- Unread, the log must be there: none means the store lost it (read, it is made).
  if ARGV[4] == '' then table.insert(xadd, 3, 'NOMKSTREAM') end
  for j = i + 2, i + 1 + n do table.insert(xadd, ARGV[j]) end
  if not redis.call(unpack(xadd)) then return -2 end
  i = i + 2 + n
end
if ARGV[11] ~= '' then redis.call('SET', KEYS[3], ARGV[11]) end
local fields = {}
if ARGV[10] ~= '' then
  fields = {'status', ARGV[9], 'summary', ARGV[10], 'owner', ARGV[13],
            'prompt_tokens', ARGV[14], 'epoch', ARGV[3]}
end
if ARGV[12] ~= '' then table.insert(fields, 'gap'); table.insert(fields, ARGV[12]) end
if ARGV[15] ~= '' then table.insert(fields, 'answer'); table.insert(fields, ARGV[15]) end
if #fields > 0 then redis.call('HSET', KEYS[1], unpack(fields)) end
if ARGV[6] == '1' then
  redis.call('DEL', KEYS[4], KEYS[3])
  redis.call('PEXPIRE', KEYS[1], ARGV[7])
  redis.call('PEXPIRE', KEYS[2], ARGV[8])
else
  redis.call('PEXPIRE', KEYS[4], ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[7]) + tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[8]) + tonumber(ARGV[2]))
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[8]) + tonumber(ARGV[2]))
end
return 1
"""
)

# Let a drained stage go, for any worker to take over at once. ARGV: token. 1: let go;
# 0: not this instance's.
HAND_OFF = Script("""
if redis.call('GET', KEYS[4]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[1], 'handoff', '1')
return 1
""")

# Claim a running stage whose lease has lapsed, under a new lease and the next epoch,
# whose marker entry fences the old owner (entries.py). The first look only marks it
# ``suspect_since``; it is claimed once it has stayed so for the grace (the time an
# owner that was only cut off from Redis has to take its lease back once Redis answers),
# or at once when its worker handed it off. ARGV: token, lease_ms, now_ms, grace_ms,
# log TTL in ms. nil when it is not to be taken now (its lease is held, it is in its
# grace); 0 when it is not running (to drop from the running index); else its epoch,
# the events its log holds, its record, owner, whether it was handed off, and summary.
TAKE_OVER = Script(
    _HELD
    + """
if redis.call('EXISTS', KEYS[4]) == 1 then return nil end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local fields = redis.call('HMGET', KEYS[1], 'record', 'owner', 'handoff', 'summary',
                          'suspect_since')
if not fields[3] then
  if not fields[5] then
    redis.call('HSET', KEYS[1], 'suspect_since', ARGV[3])
    return nil
  end
  if tonumber(ARGV[3]) - tonumber(fields[5]) < tonumber(ARGV[4]) then return nil end
end
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
redis.call('HDEL', KEYS[1], 'suspect_since', 'handoff')
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local have = held() or 0
redis.call('XADD', KEYS[2], epoch .. '-' .. have, 'm', '1')
redis.call('PEXPIRE', KEYS[2], ARGV[5])
if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], '0:0:', 'PX', ARGV[5]) end
return {epoch, have, fields[1] or '', fields[2] or '', fields[3] or '', fields[4] or '{}'}
"""
)

# End a stage whose owner died, for everyone, when nobody takes it over (reader.py):
# its ending events in one entry of the next epoch, which fences the dead owner should
# it come back. ARGV: events the log holds, the summary, ttl_ms, event_ttl_ms, the
# answer, then the ending's events. 1 if ended here; 0 if anything changed meanwhile.
DECLARE_DEAD = Script(
    _HELD
    + """
if redis.call('EXISTS', KEYS[4]) == 1 then return 0 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
local have = held() or 0
if have ~= tonumber(ARGV[1]) then return 0 end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
local entry = {}
for i = 6, #ARGV do
  table.insert(entry, tostring(have + i - 6))
  table.insert(entry, ARGV[i])
end
table.insert(entry, 't')
table.insert(entry, '1')
redis.call('XADD', KEYS[2], epoch .. '-' .. (have + #ARGV - 5), unpack(entry))
redis.call('HSET', KEYS[1], 'status', 'error', 'summary', ARGV[2], 'answer', ARGV[5])
redis.call('HDEL', KEYS[1], 'suspect_since')
redis.call('DEL', KEYS[3])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""
)

ALL = (CLAIM, RENEW, WRITE, HAND_OFF, TAKE_OVER, DECLARE_DEAD)
