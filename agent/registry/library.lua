#!lua name=emp_v1
-- emp-agent registry functions, contract version 1 (docs/registry.md). Loaded by every agent with
-- FUNCTION LOAD REPLACE when the server holds an older revision. Every function touches the keys of one machine
-- only (they share the hash tag {<machine_id>}), so each call is atomic and stays in one Redis Cluster slot.
-- Times come from the server's TIME, never from the agent.

local REVISION = 2

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Fields only these functions write; a caller's JSON cannot set them.
local PROTECTED = {epoch = true, registered_at_ms = true, last_heartbeat_ms = true}

local function hset_json(key, json)
  local fields = cjson.decode(json)
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

local function add_events(stream, maxlen, events, first)
  for i = first, #events do
    add_event(stream, maxlen, events[i])
  end
end

-- nil when `epoch` owns the record; otherwise the reply that says why not.
local function not_owner(record, epoch)
  local current = redis.call('HGET', record, 'epoch')
  if not current then
    return {'NOT_REGISTERED', 0}
  end
  if current ~= epoch then
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
  local epoch = redis.call('INCR', counter)
  local now = now_ms()
  redis.call('DEL', record)
  hset_json(record, args[1])
  redis.call('HSET', record, 'epoch', epoch, 'registered_at_ms', now, 'last_heartbeat_ms', now)
  redis.call('PEXPIRE', record, tonumber(args[2]))
  add_events(stream, tonumber(args[3]), args, 5)
  add_event(stream, tonumber(args[3]), lifecycle('registered', cjson.decode(args[1]).machine_id, epoch, now))
  redis.call('PEXPIRE', stream, tonumber(args[4]))
  return {epoch, now}
end

-- KEYS: record, event stream
-- ARGV: epoch, fields (JSON), ttl_ms, stream maxlen, events (JSON strings)...
-- Returns {'OK', now_ms}, {'NOT_REGISTERED', 0} (record missing or expired: register again) or
-- {'FENCED', current epoch} (a newer registration owns this machine id: stop writing).
local function heartbeat(keys, args)
  local record, stream = keys[1], keys[2]
  local refused = not_owner(record, args[1])
  if refused then
    return refused
  end
  local now = now_ms()
  hset_json(record, args[2])
  redis.call('HSET', record, 'last_heartbeat_ms', now)
  redis.call('PEXPIRE', record, tonumber(args[3]))
  add_events(stream, tonumber(args[4]), args, 5)
  return {'OK', now}
end

-- KEYS: record, event stream
-- ARGV: epoch, stream maxlen, events (JSON strings)...
-- Deletes the record only for the epoch that owns it. Returns {'OK'|'NOT_REGISTERED'|'FENCED', epoch}.
local function deregister(keys, args)
  local record, stream = keys[1], keys[2]
  local refused = not_owner(record, args[1])
  if refused then
    return refused
  end
  add_events(stream, tonumber(args[2]), args, 3)
  local machine_id = redis.call('HGET', record, 'machine_id')
  add_event(stream, tonumber(args[2]), lifecycle('deregistered', machine_id, tonumber(args[1]), now_ms()))
  redis.call('DEL', record)
  return {'OK', tonumber(args[1])}
end

-- KEYS: fleet index (sorted set). ARGV: machine id, 'seen' or 'gone'.
-- The index scores each machine by the server time it was last seen; it is a hint for listing, the record is
-- the truth.
local function index(keys, args)
  if args[2] == 'gone' then
    return redis.call('ZREM', keys[1], args[1])
  end
  return redis.call('ZADD', keys[1], now_ms(), args[1])
end

redis.register_function('emp_v1_revision', function() return REVISION end)
redis.register_function('emp_v1_register', register)
redis.register_function('emp_v1_heartbeat', heartbeat)
redis.register_function('emp_v1_deregister', deregister)
redis.register_function('emp_v1_index', index)
