-- epochflight: one credential's shared record, applied atomically with the
-- server's clock. The rules are those of src/auth/coord/record.rs, line for
-- line (`transition`, `from_fields`); the conformance tests run both.
--
-- KEYS[1]: the record (a hash); KEYS[2]: its event stream (waiters block on
-- it with XREAD). Both carry the same hash tag: one slot.
-- ARGV[1]: the operation; the rest depends on it (see `Op` in record.rs).
--
-- Reply: { verdict, now_ms, last_event_id, { field, value, ... } } with the
-- record after the operation (empty: never written), or
-- { 'corrupt', code } when the stored data cannot be read (nothing written),
-- or { 'bad-request' } for arguments this script does not accept.

local rec, ev = KEYS[1], KEYS[2]
local op = ARGV[1]

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- A non-negative decimal of at most 15 digits (exact as a Lua number).
local function int(s)
  if type(s) ~= 'string' or #s == 0 or #s > 15 or not string.match(s, '^%d+$') then
    return nil
  end
  return tonumber(s)
end

local function num(n)
  return string.format('%.0f', n)
end

local FIELDS = { v = true, g = true, st = true, tok = true, exp = true,
                 own = true, at = true, lu = true, rg = true, cu = true }

-- The record, false if never written, or nil and a corruption code.
local function load()
  local et = redis.call('TYPE', ev)['ok']
  if et ~= 'none' and et ~= 'stream' then return nil, 'wrongtype' end
  local rt = redis.call('TYPE', rec)['ok']
  if rt == 'none' then return false end
  if rt ~= 'hash' then return nil, 'wrongtype' end
  local flat = redis.call('HGETALL', rec)
  local r = {}
  for i = 1, #flat, 2 do
    local k = flat[i]
    if not FIELDS[k] then return nil, 'undecodable:unknown' end
    r[k] = flat[i + 1]
  end
  if r.v == nil then return nil, 'truncated:v' end
  if r.v ~= '1' then return nil, 'version' end
  if r.g == nil then return nil, 'truncated:g' end
  r.g = int(r.g)
  if r.g == nil then return nil, 'undecodable:g' end
  if r.st == nil then return nil, 'truncated:st' end
  if r.exp ~= nil then
    r.exp = int(r.exp)
    if r.exp == nil then return nil, 'undecodable:exp' end
  end
  local allowed
  if r.st == 'ready' or r.st == 'signed_out' then
    allowed = {}
  elseif r.st == 'cooling' then
    if r.cu == nil then return nil, 'truncated:cu' end
    r.cu = int(r.cu)
    if r.cu == nil then return nil, 'undecodable:cu' end
    allowed = { cu = true }
  elseif r.st == 'sending' then
    if r.own == nil then return nil, 'truncated:own' end
    if #r.own ~= 32 or not string.match(r.own, '^%x+$') then return nil, 'undecodable:own' end
    if r.rg == nil then return nil, 'truncated:rg' end
    if r.rg ~= '0' and r.rg ~= '1' then return nil, 'undecodable:rg' end
    if r.at == nil then return nil, 'truncated:at' end
    r.at = int(r.at)
    if r.at == nil then return nil, 'undecodable:at' end
    if r.lu == nil then return nil, 'truncated:lu' end
    r.lu = int(r.lu)
    if r.lu == nil then return nil, 'undecodable:lu' end
    allowed = { own = true, at = true, lu = true, rg = true }
  else
    return nil, 'unknown-state'
  end
  for _, f in ipairs({ 'own', 'at', 'lu', 'rg', 'cu' }) do
    if r[f] ~= nil and not allowed[f] then return nil, 'undecodable:' .. f end
  end
  return r
end

local r, problem = load()
if r == nil then return { 'corrupt', problem } end

local function last_event()
  local last = redis.call('XREVRANGE', ev, '+', '-', 'COUNT', 1)
  if #last > 0 then return last[1][1] end
  return '0-0'
end

local function reply(verdict)
  local flat = {}
  if redis.call('EXISTS', rec) == 1 then flat = redis.call('HGETALL', rec) end
  return { verdict, now, last_event(), flat }
end

-- Replaces the record with `n` and tells the waiters.
local function save(n)
  local args = { 'v', '1', 'g', num(n.g), 'st', n.st }
  if n.tok then table.insert(args, 'tok'); table.insert(args, n.tok) end
  if n.exp then table.insert(args, 'exp'); table.insert(args, num(n.exp)) end
  if n.st == 'sending' then
    for _, f in ipairs({ 'own', 'at', 'lu', 'rg' }) do
      table.insert(args, f)
      local v = n[f]
      if type(v) == 'number' then v = num(v) end
      table.insert(args, v)
    end
  elseif n.st == 'cooling' then
    table.insert(args, 'cu'); table.insert(args, num(n.cu))
  end
  redis.call('DEL', rec)
  redis.call('HSET', rec, unpack(args))
  redis.call('XADD', ev, 'MAXLEN', '~', '64', '*', 'g', num(n.g), 'op', op)
end

local cur = r or { g = 0, st = 'ready' }
local g = cur.g

-- The state as it stands now (`Record::effective`).
local function effective()
  if cur.st == 'sending' and now >= cur.lu then return 'lost' end
  if cur.st == 'cooling' and now >= cur.cu then return 'ready' end
  return cur.st
end

-- Whether `owner` holds the claim of generation `gen` (live or lost).
local function holds(gen, owner)
  if g > gen then return 'newer' end
  if g < gen then return 'behind' end
  if cur.st == 'sending' and cur.own == owner then return nil end
  return 'fenced'
end

local function expiry(s)
  if s == '' then return nil end
  return now + int(s)
end

if op == 'read' then
  return reply('done')

elseif op == 'claim' then
  local seen, owner, lease, grace = int(ARGV[2]), ARGV[3], int(ARGV[4]), int(ARGV[5])
  if seen == nil or lease == nil or grace == nil then return { 'bad-request' } end
  if g > seen then return reply('newer') end
  if g < seen then return reply('behind') end
  local e = effective()
  local function sending(rg)
    save({ g = g, st = 'sending', tok = cur.tok, exp = cur.exp,
           own = owner, at = now, lu = now + lease, rg = rg })
  end
  if e == 'ready' then sending('0'); return reply('claimed') end
  -- The same claim again (a retry whose first reply was lost).
  if e == 'sending' and cur.own == owner then
    if cur.rg == '1' then return reply('claimed-grace') end
    return reply('claimed')
  end
  if e == 'sending' then return reply('busy') end
  if e == 'cooling' then return reply('cooling') end
  if e == 'signed_out' then return reply('signed-out') end
  -- lost
  if grace > 0 and cur.rg == '0' and now < cur.at + grace then
    sending('1')
    return reply('claimed-grace')
  end
  return reply('lost')

elseif op == 'commit' then
  local gen, owner, tok, exp = int(ARGV[2]), ARGV[3], ARGV[4], ARGV[5]
  if gen == nil or (exp ~= '' and int(exp) == nil) then return { 'bad-request' } end
  local v = holds(gen, owner)
  if v == 'newer' then return reply('fenced') end
  if v then return reply(v) end
  save({ g = g + 1, st = 'ready', tok = tok, exp = expiry(exp) })
  return reply('done')

elseif op == 'reject' then
  local gen, owner = int(ARGV[2]), ARGV[3]
  if gen == nil then return { 'bad-request' } end
  local v = holds(gen, owner)
  if v then return reply(v) end
  save({ g = g + 1, st = 'signed_out' })
  return reply('signed-out')

elseif op == 'transient' then
  local gen, owner, cooldown = int(ARGV[2]), ARGV[3], int(ARGV[4])
  if gen == nil or cooldown == nil then return { 'bad-request' } end
  local v = holds(gen, owner)
  if v then return reply(v) end
  local n = { g = g, tok = cur.tok, exp = cur.exp }
  if cur.rg == '1' then
    -- The grace re-claim presented a refresh token the server had seen
    -- already: no attempt after it (lost at once).
    n.st, n.own, n.at, n.lu, n.rg = 'sending', cur.own, cur.at, now, '1'
  elseif cooldown == 0 then
    n.st = 'ready'
  else
    n.st, n.cu = 'cooling', now + cooldown
  end
  save(n)
  return reply('done')

elseif op == 'sign_in' then
  local tok, exp, min_g = ARGV[2], ARGV[3], int(ARGV[4])
  if min_g == nil or (exp ~= '' and int(exp) == nil) then return { 'bad-request' } end
  save({ g = math.max(g + 1, min_g), st = 'ready', tok = tok, exp = expiry(exp) })
  return reply('done')

elseif op == 'sign_out' then
  local min_g = int(ARGV[2])
  if min_g == nil then return { 'bad-request' } end
  save({ g = math.max(g + 1, min_g), st = 'signed_out' })
  return reply('done')

elseif op == 'seed' then
  local tok, exp, min_g = ARGV[2], ARGV[3], int(ARGV[4])
  if min_g == nil or (exp ~= '' and int(exp) == nil) then return { 'bad-request' } end
  if r then return reply('exists') end
  save({ g = math.max(min_g, 1), st = 'ready', tok = tok, exp = expiry(exp) })
  return reply('done')

elseif op == 'reseed' then
  local gen, tok, exp = int(ARGV[2]), ARGV[3], ARGV[4]
  if gen == nil or (exp ~= '' and int(exp) == nil) then return { 'bad-request' } end
  if g >= gen then return reply('exists') end
  save({ g = gen, st = 'ready', tok = tok, exp = expiry(exp) })
  return reply('done')
end

return { 'bad-request' }
