"""The fleet request queue's wire format on Redis, shared by the daemons that serve it
(``streamd.service.redis_requests``) and the clients that submit to it
(``streamd.client.redis_detect``). Full description: docs/FLEET.md.

A task is one stream entry; its fields:

- ``task_id``: chosen by the submitter (``TASK_ID``); the result is stored under it
- ``header``: the ZeroMQ request header as JSON (``request_id``, ``client_id``, ``priority``,
  thresholds), optional
- ``image``: JPEG or PNG bytes
- ``reply_to``: optional list key; the task id is pushed there once its answer is stored

The three operations that must not be split are Lua scripts, run atomically by Redis: no
command or script of Redis itself checks a bound before adding, or stores an answer only
once while acknowledging the entry in the same step.
"""

from __future__ import annotations

import re

FORMAT_VERSION = 1
TASK_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")


def limit_key(stream: str) -> str:
    """Where the daemons store the stream's bound (``requests.redis.max_queued``)."""
    return f"{stream}:max_queued"


def result_key(prefix: str, task_id: str) -> str:
    return f"{prefix}:{task_id}"


# KEYS: stream, its limit key. ARGV: the bound to use while no daemon has stored one, then the
# entry's field/value pairs. Returns the entry id, or nil when the stream holds the bound
# already ("busy": nothing was added). Entries are deleted once answered, so XLEN counts the
# tasks submitted and not yet answered.
SUBMIT_SCRIPT = """
local limit = tonumber(redis.call('GET', KEYS[2]) or ARGV[1])
if redis.call('XLEN', KEYS[1]) >= limit then return false end
return redis.call('XADD', KEYS[1], '*', unpack(ARGV, 2))
"""

# KEYS: result key, stream, reply list (may be the empty string when none).
# ARGV: answer JSON, TTL seconds, group, entry id, task id.
# The answer is stored only if none is (SET NX): a task reclaimed from a worker that was only
# slow, not dead, is then inferred twice but answered once. The entry is acknowledged and
# deleted either way. Returns 1 when this answer was stored, 0 when another was first.
ANSWER_SCRIPT = """
local fresh = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2])
if fresh and KEYS[3] ~= '' then
  redis.call('RPUSH', KEYS[3], ARGV[5])
  redis.call('EXPIRE', KEYS[3], ARGV[2])
end
redis.call('XACK', KEYS[2], ARGV[3], ARGV[4])
redis.call('XDEL', KEYS[2], ARGV[4])
if fresh then return 1 end
return 0
"""

# KEYS: stream. ARGV: group, consumer, entry ids. Resets the idle time of the entries this
# consumer still holds (a lease: only entries idle longer than reclaim_idle_s are taken over),
# leaving alone any that another consumer already took.
RENEW_SCRIPT = """
local n = 0
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
  if #p > 0 then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    n = n + 1
  end
end
return n
"""

# KEYS: stream. ARGV: group, consumer, entry id. A daemon that stops puts back a task it holds
# but has not answered: the same fields appended at the end (so a free daemon takes it at
# once, not after reclaim_idle_s), the old entry acknowledged and deleted. Only while this
# consumer still holds it. Returns 1 when handed back.
HAND_BACK_SCRIPT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2])
if #p == 0 then return 0 end
local e = redis.call('XRANGE', KEYS[1], ARGV[3], ARGV[3])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
if #e == 0 then return 0 end
redis.call('XADD', KEYS[1], '*', unpack(e[1][2]))
return 1
"""

# KEYS: stream. ARGV: group, idle milliseconds, the caller's own consumer name. Removes from
# the group the consumers that hold nothing and were idle that long (daemons that stopped:
# every daemon joins under a name of its own), never one holding a task, whose task the
# group would otherwise forget. Returns how many were removed.
PRUNE_SCRIPT = """
local n = 0
for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  local f = {}
  for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
  if f['pending'] == 0 and f['idle'] > tonumber(ARGV[2]) and f['name'] ~= ARGV[3] then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
    n = n + 1
  end
end
return n
"""
