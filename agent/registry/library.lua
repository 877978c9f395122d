#!lua name=emp_v1
-- emp-agent registry functions, contract version 1 (docs/registry.md). Loaded by every agent with
-- FUNCTION LOAD REPLACE when the server holds an older revision. Every function touches the keys of one machine
-- only (they share the hash tag {<machine_id>}), so each call is atomic and stays in one Redis Cluster slot.
-- Times come from the server's TIME, never from the agent.

local REVISION = 3
-- How long a machine's epoch counter outlives its last registration (epochs only grow while it lives).
local EPOCH_TTL_MS = 30 * 24 * 3600 * 1000
-- Fleet index members not seen for this long are dropped by the next `seen`.
local INDEX_KEEP_MS = 24 * 3600 * 1000

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Fields only these functions write; a caller's JSON cannot set them.
local PROTECTED = {epoch = true, registered_at_ms = true, last_heartbeat_ms = true}

local function hset_fields(key, fields)
  local flat = {}
  for name, value in pairs(fields) do
    if not PROTECTED[name] then
      flat[#flat + 1] = name
      flat[#flat + 1] = tostring(value)
    end
  end
  if #flat > 0 then
    redis.call('HSET', key, unpack(flat))
  end
end

local function add_event(stream, maxlen, event)
  redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'event', event)
  redis.call('PUBLISH', 'emp:events', event)
end

-- Appends events[first..] and keeps the stream alive for ttl_ms after the last one.
local function add_events(stream, maxlen, ttl_ms, events, first)
  for i = first, #events do
    add_event(stream, maxlen, events[i])
  end
  if #events >= first then
    redis.call('PEXPIRE', stream, ttl_ms)
  end
end

-- nil when `epoch` (with `instance`, the agent process) owns the record; otherwise the reply that says why not.
-- A record of an older epoch (a server restored from an old snapshot, a failover to a lagging replica) is not a
-- newer owner: the caller registers again. A newer epoch taken by the same agent process (a registration that
-- arrived late) is handed back to it as {'ADOPT', epoch}.
local function not_owner(record, epoch, instance)
  local current = redis.call('HGET', record, 'epoch')
  if not current then
    return {'NOT_REGISTERED', 0}
  end
  if tonumber(current) < tonumber(epoch) then
    return {'NOT_REGISTERED', 0}
  end
  if tonumber(current) > tonumber(epoch) then
    if instance ~= '' and redis.call('HGET', record, 'instance_id') == instance then
      return {'ADOPT', tonumber(current)}
    end
    return {'FENCED', tonumber(current)}
  end
  return nil
end

local function lifecycle(name, machine_id, epoch, now)
  return cjson.encode({type = 'machine', event = name, machine_id = machine_id, epoch = epoch, at_ms = now})
end

-- KEYS: record, epoch counter, event stream
-- ARGV: fields (JSON object of strings), ttl_ms, stream maxlen, stream ttl_ms, events (JSON strings)...
-- A new epoch each time: a later registration fences every earlier one. Returns {epoch, now_ms}.
local function register(keys, args)
  local record, counter, stream = keys[1], keys[2], keys[3]
  local fields = cjson.decode(args[1])
  local epoch = redis.call('INCR', counter)
  redis.call('PEXPIRE', counter, EPOCH_TTL_MS)
  local now = now_ms()
  redis.call('DEL', record)
  hset_fields(record, fields)
  redis.call('HSET', record, 'epoch', epoch, 'registered_at_ms', now, 'last_heartbeat_ms', now)
  redis.call('PEXPIRE', record, tonumber(args[2]))
  add_events(stream, tonumber(args[3]), tonumber(args[4]), args, 5)
  add_event(stream, tonumber(args[3]), lifecycle('registered', fields.machine_id, epoch, now))
  redis.call('PEXPIRE', stream, tonumber(args[4]))
  return {epoch, now}
end

-- KEYS: record, event stream
-- ARGV: epoch, instance id, fields (JSON), ttl_ms, stream maxlen, stream ttl_ms, status channel, status message,
--       events (JSON strings)...
-- Returns {'OK', now_ms}; {'NOT_REGISTERED', 0} (missing, expired or older: register again); {'FENCED', epoch}
-- (a newer registration owns this machine id: stop writing); {'ADOPT', epoch} (our own late registration: use
-- its epoch); {'CAPS_NEEDED', 0} (the stored capabilities are not the ones named by caps_hash: send them).
-- Writes nothing unless it answers OK. The status message (the original system's) is published only on OK.
local function heartbeat(keys, args)
  local record, stream = keys[1], keys[2]
  local refused = not_owner(record, args[1], args[2])
  if refused then
    return refused
  end
  local fields = cjson.decode(args[3])
  if fields.capabilities == nil and fields.caps_hash ~= nil
      and redis.call('HGET', record, 'caps_hash') ~= fields.caps_hash then
    return {'CAPS_NEEDED', 0}
  end
  local now = now_ms()
  hset_fields(record, fields)
  redis.call('HSET', record, 'last_heartbeat_ms', now)
  redis.call('PEXPIRE', record, tonumber(args[4]))
  add_events(stream, tonumber(args[5]), tonumber(args[6]), args, 9)
  if args[7] ~= '' then
    redis.call('PUBLISH', args[7], args[8])
  end
  return {'OK', now}
end

-- KEYS: record, event stream
-- ARGV: epoch, instance id, stream maxlen, stream ttl_ms, events (JSON strings)...
-- Deletes the record only for the epoch that owns it. Returns {'OK'|'NOT_REGISTERED'|'FENCED', epoch}.
local function deregister(keys, args)
  local record, stream = keys[1], keys[2]
  local refused = not_owner(record, args[1], args[2])
  if refused and refused[1] ~= 'ADOPT' then
    return refused
  end
  local owner = refused and refused[2] or tonumber(args[1])
  add_events(stream, tonumber(args[3]), tonumber(args[4]), args, 5)
  local machine_id = redis.call('HGET', record, 'machine_id')
  add_event(stream, tonumber(args[3]), lifecycle('deregistered', machine_id, owner, now_ms()))
  redis.call('DEL', record)
  return {'OK', owner}
end

-- KEYS: fleet index (sorted set). ARGV: machine id, 'seen' or 'gone'.
-- The index scores each machine by the server time it was last seen; it is a hint for listing, the record is
-- the truth. `seen` also drops members not seen for a day.
local function index(keys, args)
  if args[2] == 'gone' then
    return redis.call('ZREM', keys[1], args[1])
  end
  local now = now_ms()
  redis.call('ZREMRANGEBYSCORE', keys[1], '-inf', now - INDEX_KEEP_MS)
  return redis.call('ZADD', keys[1], now, args[1])
end

redis.register_function('emp_v1_revision', function() return REVISION end)
redis.register_function('emp_v1_register', register)
redis.register_function('emp_v1_heartbeat', heartbeat)
redis.register_function('emp_v1_deregister', deregister)
redis.register_function('emp_v1_index', index)
