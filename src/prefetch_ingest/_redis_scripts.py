"""The Lua scripts of the Redis store.

Each script runs atomically in Redis and touches only the keys of one entry
(one hash slot), which it receives in ``KEYS``:

- ``KEYS[1]``: the record (completed value or failure),
- ``KEYS[2]``: the lease,
- ``KEYS[3]``: the failure notice.

Layouts the scripts rely on (see :mod:`prefetch_ingest._redis_records`):

- a record starts with 3 bytes of magic, 1 byte of kind (``c`` completed,
  ``f`` failed), then the 32-character token of the run that wrote it;
- a lease and a notice start with the 32-character token of their run.

A *token* is random per run (``secrets.token_hex(16)``) and is never reused,
so "the lease still holds my token" is an exact fencing test: a run whose
lease lapsed (and was perhaps taken by another process) cannot write.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "COMPLETE", "INVALIDATE", "RELEASE", "RENEW"]

ACQUIRE = """
-- Look at the entry and, when nobody runs it and no acceptable result exists,
-- take the lease (SET NX PX).
-- ARGV: 1 lease value (token..metadata), 2 lease ms, 3 force ('0'|'1'),
--       4 channel, 5 "started" message, 6.. tokens of runs whose result we accept
-- Returns {0, ''} lease taken; {1, record} a result to use;
--         {2, notice} a run we waited on failed; {3, lease} someone else runs it.
local function accepted(token)
  for i = 6, #ARGV do
    if ARGV[i] == token then return true end
  end
  return false
end
local rec = redis.call('GET', KEYS[1])
if rec and (ARGV[3] == '0' or accepted(string.sub(rec, 5, 36))) then
  return {1, rec}
end
if #ARGV >= 6 then
  local notice = redis.call('GET', KEYS[3])
  if notice and accepted(string.sub(notice, 1, 32)) then
    return {2, notice}
  end
end
local lease = redis.call('GET', KEYS[2])
if lease then
  return {3, lease}
end
redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {0, ''}
"""

COMPLETE = """
-- Write a run's outcome, only while its lease still holds its token (fencing);
-- then drop the lease and publish.
-- ARGV: 1 token, 2 record, 3 record ms ('' = no expiry, '0' = do not write the
--       record), 4 '1' if this is a failure, 5 notice, 6 notice ms,
--       7 channel, 8 message
-- Returns 1 written, 0 the lease was lost (nothing written).
local lease = redis.call('GET', KEYS[2])
if not lease or string.sub(lease, 1, 32) ~= ARGV[1] then
  return 0
end
local write = ARGV[3] ~= '0'
if write and ARGV[4] == '1' then
  -- a failure never replaces a completed value (a failed refresh keeps it)
  local rec = redis.call('GET', KEYS[1])
  if rec and string.sub(rec, 4, 4) == 'c' then write = false end
end
if write then
  if ARGV[3] == '' then
    redis.call('SET', KEYS[1], ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
end
redis.call('DEL', KEYS[2])
redis.call('PUBLISH', ARGV[7], ARGV[8])
return 1
"""

RENEW = """
-- Extend the lease if it still holds the token; with a new value, replace
-- its metadata (progress) too and publish.
-- ARGV: 1 token, 2 lease ms, 3 new lease value or '', 4 channel, 5 message
-- Returns 1 renewed, 0 lost.
local lease = redis.call('GET', KEYS[2])
if not lease or string.sub(lease, 1, 32) ~= ARGV[1] then
  return 0
end
if ARGV[3] == '' then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[2])
  redis.call('PUBLISH', ARGV[4], ARGV[5])
end
return 1
"""

RELEASE = """
-- Compare-and-delete: drop the lease only if it still holds the token.
-- ARGV: 1 token, 2 channel, 3 message. Returns 1 released, 0 not ours.
local lease = redis.call('GET', KEYS[2])
if lease and string.sub(lease, 1, 32) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

INVALIDATE = """
-- Forget the stored result or failure (a running load is left alone).
-- ARGV: 1 channel, 2 message. Returns the number of keys deleted.
local n = redis.call('DEL', KEYS[1], KEYS[3])
if n > 0 then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return n
"""
