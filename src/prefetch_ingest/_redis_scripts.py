"""The Lua scripts of the Redis store: the primitives that need atomicity.

Each script runs atomically in Redis and touches only the keys of one entry
(one hash slot, by the ``{digest}`` hash tag), which it receives in ``KEYS``:

- ``KEYS[1]``: the outcome (completed value or failure),
- ``KEYS[2]``: the lease,
- ``KEYS[3]``: the note (a cancelled run's token, or a failed refresh's error).

Layouts the scripts rely on (see :mod:`prefetch_ingest._redis_records`): an
outcome is ``b"P"``, its kind (``c``/``f``), the 16-character token of the run
that wrote it, then its 16-digit fence; a lease starts with the token, then
the fence; a cancel note is a token.

A *token* is random per run and never reused, so "the lease still holds my
token" is an exact fencing test. A *fence* only grows for a key: the acquire
script gives a new lease the greater of the server's clock in microseconds
(``TIME``) and one more than the fence of the outcome it finds, so a run
always holds a greater fence than the run whose result it replaces, even
after a restart that lost every key. The completion script refuses to replace
an outcome of a greater fence.
"""

from __future__ import annotations

__all__ = ["ACQUIRE", "CANCEL", "COMPLETE", "INVALIDATE", "RELEASE", "RENEW"]

_FENCE_OF = """
-- The fence of a stored outcome, or nil for bytes that are not one of ours.
-- Fences saturate at 2^53 - 1, the greatest integer a Lua number holds exactly.
local CAP = 9007199254740991
local function fence_of(rec)
  if not rec or string.sub(rec, 1, 1) ~= 'P' then return nil end
  local f = string.sub(rec, 19, 34)
  if #f ~= 16 or not string.match(f, '^%d+$') then return nil end
  return math.min(tonumber(f), CAP)
end
"""

ACQUIRE = (
    _FENCE_OF
    + """
-- Take the lease unless there is an outcome to use or a live lease.
-- ARGV: 1 token, 2 lease metadata, 3 lease ms, 4 force ('0'|'1'),
--       5 channel, 6 message, 7.. tokens of runs whose outcome we accept
-- Returns {0, fence} taken; {1, outcome, lease, note} ('' for absent) not taken.
local function accepted(token)
  for i = 7, #ARGV do
    if ARGV[i] == token then return true end
  end
  return false
end
local rec = redis.call('GET', KEYS[1])
local lease = redis.call('GET', KEYS[2])
local note = redis.call('GET', KEYS[3])
if rec and ((ARGV[4] == '0' and string.sub(rec, 2, 2) == 'c')
            or accepted(string.sub(rec, 3, 18))) then
  return {1, rec, lease or '', note or ''}
end
if lease or (note and accepted(string.sub(note, 2, 17))) then
  return {1, rec or '', lease or '', note or ''}
end
local now = redis.call('TIME')
local fence = tonumber(now[1]) * 1000000 + tonumber(now[2])
local prev = fence_of(rec)
if prev and prev >= fence then fence = math.min(prev + 1, CAP) end
fence = string.format('%016.0f', fence)
redis.call('SET', KEYS[2], ARGV[1] .. fence .. ARGV[2], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {0, fence}
"""
)

COMPLETE = (
    _FENCE_OF
    + """
-- Write a run's outcome only while its lease holds its token (fencing) and no
-- outcome of a greater fence is stored; then drop the lease and publish.
-- ARGV: 1 token, 2 outcome, 3 keep ms ('' = no expiry), 4 '1' if a failure,
--       5 channel, 6 message, 7 failure note, 8 its ms
-- Returns 1 written, 0 the lease was lost, 2 superseded (lease dropped).
local lease = redis.call('GET', KEYS[2])
if not lease or string.sub(lease, 1, 16) ~= ARGV[1] then
  return 0
end
local rec = redis.call('GET', KEYS[1])
local theirs = fence_of(rec)
redis.call('DEL', KEYS[2])
if theirs and theirs > tonumber(string.sub(lease, 17, 32)) then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
  return 2
end
-- a failure never replaces a completed value (a failed refresh keeps it): it is
-- left as a note for the run's followers (ARGV[7] the note, ARGV[8] its ms)
if ARGV[4] == '1' and rec and string.sub(rec, 2, 2) == 'c' then
  redis.call('SET', KEYS[3], ARGV[7], 'PX', ARGV[8])
else
  if ARGV[3] == '' then
    redis.call('SET', KEYS[1], ARGV[2])
  else
    redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
end
redis.call('PUBLISH', ARGV[5], ARGV[6])
return 1
"""
)

RENEW = """
-- Extend the lease if it holds the token; with progress, write it after the
-- lease's fixed 41-byte head (token, fence, start, origin) and publish.
-- ARGV: 1 token, 2 lease ms, 3 progress JSON, 4 '1' with progress,
--       5 channel, 6 message. Returns 1 renewed, 0 lost.
local lease = redis.call('GET', KEYS[2])
if not lease or string.sub(lease, 1, 16) ~= ARGV[1] then
  return 0
end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[2], string.sub(lease, 1, 41) .. ARGV[3], 'PX', ARGV[2])
  redis.call('PUBLISH', ARGV[5], ARGV[6])
else
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

RELEASE = """
-- Compare-and-delete the lease. ARGV: 1 token, 2 channel, 3 message.
-- Returns 1 released, 0 not ours.
local lease = redis.call('GET', KEYS[2])
if lease and string.sub(lease, 1, 16) == ARGV[1] then
  redis.call('DEL', KEYS[2])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
"""

INVALIDATE = """
-- Forget the outcome and detach the running run (its completion will find no
-- lease). ARGV: 1 channel, 2 message. Returns 1 if an outcome was deleted.
local n = redis.call('DEL', KEYS[1])
local m = redis.call('DEL', KEYS[2])
if n + m > 0 then
  redis.call('PUBLISH', ARGV[1], ARGV[2])
end
return n
"""

CANCEL = """
-- End the running run: drop its lease, leave a note of its token.
-- ARGV: 1 note ms, 2 channel, 3 message. Returns the token, or '' if none ran.
local lease = redis.call('GET', KEYS[2])
if not lease then
  return ''
end
local token = string.sub(lease, 1, 16)
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], 'x' .. token, 'PX', ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return token
"""
