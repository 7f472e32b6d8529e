"""The Lua scripts of the Redis store.

Each script runs atomically in Redis and touches only the keys of one entry
(one hash slot), which it receives in ``KEYS``:

- ``KEYS[1]``: the record (completed value or failure),
- ``KEYS[2]``: the lease,
- ``KEYS[3]``: the failure notice.

Layouts the scripts rely on (see :mod:`prefetch_ingest._redis_records`):

- a record starts with 3 bytes of magic, 1 byte of kind (``c`` completed,
  ``f`` failed), the 32-character token of the run that wrote it, then its
  16-digit fence;
- a lease starts with the 32-character token of its run, then its 16-digit
  fence; a notice starts with the token.

A *token* is random per run (``secrets.token_hex(16)``) and is never reused,
so "the lease still holds my token" is an exact fencing test: a run whose
lease lapsed (and was perhaps taken by another process) cannot write.

A *fence* is a number that only grows for a key, for the runs that outside
systems see: the acquire script gives a new lease the greater of the Redis
server's clock in microseconds (``TIME``) and one more than the fence of the
record it finds. So a run always holds a greater fence than the run whose
result it replaces, and, because the server's clock has moved on, than any run
before a restart that lost every key (the *epoch* the clock provides survives
the data). The completion script refuses to replace a record that holds a
greater fence than the writer's, and a load can hand its fence to another
system (:func:`prefetch_ingest.redis.current_fence`) so that system can refuse
stale writers too.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "COMPLETE", "INVALIDATE", "RELEASE", "RENEW"]

_FENCE_OF = """
-- The fence of a stored record as a number, or nil for bytes that are not a
-- record of ours. Fences saturate at 2^53 - 1, the greatest integer a Lua
-- number (a double) holds exactly: the clock is at about 1.8e15 microseconds,
-- so only a record written by someone else can hold more.
local CAP = 9007199254740991
local function fence_of(rec)
  if not rec or string.sub(rec, 1, 3) ~= 'PI2' then return nil end
  local f = string.sub(rec, 37, 52)
  if #f ~= 16 or not string.match(f, '^%d+$') then return nil end
  return math.min(tonumber(f), CAP)
end
"""

ACQUIRE = (
    _FENCE_OF
    + """
-- Look at the entry and, when nobody runs it and no acceptable result exists,
-- take the lease (SET NX PX) under a new fence.
-- ARGV: 1 token, 2 lease metadata, 3 lease ms, 4 force ('0'|'1'),
--       5 channel, 6 "started" message, 7.. tokens of runs whose result we accept
-- Returns {0, fence} lease taken; {1, record} a result to use;
--         {2, notice} a run we waited on failed; {3, lease} someone else runs it.
local function accepted(token)
  for i = 7, #ARGV do
    if ARGV[i] == token then return true end
  end
  return false
end
local rec = redis.call('GET', KEYS[1])
if rec and (ARGV[4] == '0' or accepted(string.sub(rec, 5, 36))) then
  return {1, rec}
end
if #ARGV >= 7 then
  local notice = redis.call('GET', KEYS[3])
  if notice and accepted(string.sub(notice, 1, 32)) then
    return {2, notice}
  end
end
local lease = redis.call('GET', KEYS[2])
if lease then
  return {3, lease}
end
-- the fence: the server's clock in microseconds, or one more than the fence of
-- the record being replaced if that is greater (a record not of ours is ignored)
local now = redis.call('TIME')
local fence = tonumber(now[1]) * 1000000 + tonumber(now[2])
local prev = fence_of(rec)
if prev and prev >= fence then fence = math.min(prev + 1, CAP) end
fence = string.format('%016.0f', fence)
redis.call('SET', KEYS[2], ARGV[1] .. fence .. ARGV[2], 'NX', 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {0, fence}
"""
)

COMPLETE = (
    _FENCE_OF
    + """
-- Write a run's outcome, only while its lease still holds its token (fencing)
-- and no record of a greater fence is stored; then drop the lease and publish.
-- ARGV: 1 token, 2 record, 3 record ms ('' = no expiry, '0' = do not write the
--       record), 4 '1' if this is a failure, 5 notice, 6 notice ms,
--       7 channel, 8 message
-- Returns 1 written, 0 the lease was lost (nothing written), 2 a record of a
-- greater fence is stored (nothing written, the lease dropped).
local lease = redis.call('GET', KEYS[2])
if not lease or string.sub(lease, 1, 32) ~= ARGV[1] then
  return 0
end
local rec = redis.call('GET', KEYS[1])
local theirs = fence_of(rec)
if theirs and theirs > tonumber(string.sub(lease, 33, 48)) then
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[7], ARGV[8])
  return 2
end
local write = ARGV[3] ~= '0'
if write and ARGV[4] == '1' then
  -- a failure never replaces a completed value (a failed refresh keeps it)
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
)

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
