-- wrk script: rotates through the seeded users and their tokens.
-- Usage: wrk ... -s bench/requests.lua <url> -- <scenario>
-- Scenarios: list, get, create, patch, mixed (40% list, 40% get, 10% patch, 10% create),
-- health, and the conditional ones: get304 (GET one with If-None-Match naming its current
-- version: 304), patch-if-match (PATCH with If-Match naming its current version: 200),
-- create-key (create with a fresh Idempotency-Key each time); and the sync ones:
-- changes-poll (the feed with an up-to-date cursor), changes-20 (with a cursor 20
-- changes behind), list-sorted (?sort=-updated_at&limit=20), list-search
-- (?q=1&limit=20), page1, page50-keyset and page50-offset (pages 1 and 50 of a
-- user with 10,000 tasks, limit=20; page 50 by cursor or by offset=980).
-- Reads "user token first_task_id" lines from the file named by BENCH_USERS, and
-- "task_path version" lines from BENCH_VERSIONS for get304 and patch-if-match; the feed
-- users from BENCH_FEED and the 10,000-task user from BENCH_BIG (bench/sync_setup.py).
-- Every request is formatted once, in init, or (when it must differ each time) spliced
-- from two preformatted halves: building strings per request would make the load
-- generator, which shares the machine, take CPU the server and database need.

local scenario
local counter = 0
local TASKS_PER_USER = 20
local lists, gets, creates, patches = {}, {}, {}, {}
local not_modified, guarded, keyed = {}, {}, {}
local sorted, searched, polls, behind = {}, {}, {}, {}
local big = {}
local key_prefix
local health

-- Each wrk thread gets an index, so that threads patch disjoint tasks.
local threads_set_up = 0
function setup(thread)
  thread:set("thread_index", threads_set_up)
  threads_set_up = threads_set_up + 1
end

-- A request with `marker` in a header value, split around it.
local function halves(method, path, headers, body, marker)
  local request = wrk.format(method, path, headers, body)
  local at = request:find(marker, 1, true)
  return request:sub(1, at - 1), request:sub(at + #marker)
end

function init(args)
  scenario = args[1] or "list"
  local index = thread_index or 0
  local threads = tonumber(os.getenv("BENCH_THREADS") or "1")
  local versions = {}
  if os.getenv("BENCH_VERSIONS") then
    for line in io.lines(os.getenv("BENCH_VERSIONS")) do
      local path, version = line:match("(%S+) (%S+)")
      versions[path] = tonumber(version)
    end
  end
  local users = {}
  for line in io.lines(os.getenv("BENCH_USERS")) do
    local user, token, first = line:match("(%S+) (%S+) (%S+)")
    users[#users + 1] = { name = user, token = token, first = tonumber(first) }
  end
  for _, u in ipairs(users) do
    local path = "/api/" .. u.name .. "/tasks"
    local auth = { ["Authorization"] = "Bearer " .. u.token }
    local json = { ["Authorization"] = "Bearer " .. u.token, ["Content-Type"] = "application/json" }
    lists[#lists + 1] = wrk.format("GET", path .. "?limit=20", auth)
    sorted[#sorted + 1] = wrk.format("GET", path .. "?sort=-updated_at&limit=20", auth)
    searched[#searched + 1] = wrk.format("GET", path .. "?q=1&limit=20", auth)
    local body = '{"title": "benchmark task", "description": "made by wrk"}'
    creates[#creates + 1] = wrk.format("POST", path, json, body)
    local with_key = { ["Authorization"] = "Bearer " .. u.token, ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = "@KEY@" }
    local pre, post = halves("POST", path, with_key, body, "@KEY@")
    keyed[#keyed + 1] = { pre = pre, post = post }
  end
  -- Tasks in the order task 0 of every user, task 1 of every user, …: consecutive
  -- requests go to different users, as pgbench's random ids do. (One user's writes
  -- queue on the user's change counter, so a walk through one user's tasks would
  -- measure that queue instead.)
  local n = 0
  for i = 0, TASKS_PER_USER - 1 do
    for _, u in ipairs(users) do
      local task = "/api/" .. u.name .. "/tasks/" .. (u.first + i)
      local auth = { ["Authorization"] = "Bearer " .. u.token }
      local json = { ["Authorization"] = "Bearer " .. u.token, ["Content-Type"] = "application/json" }
      local change = '{"complete": ' .. ((i % 2 == 0) and "true" or "false") .. '}'
      gets[#gets + 1] = wrk.format("GET", task, auth)
      patches[#patches + 1] = wrk.format("PATCH", task, json, change)
      local version = versions[task]
      if version then
        not_modified[#not_modified + 1] = wrk.format("GET", task,
          { ["Authorization"] = "Bearer " .. u.token, ["If-None-Match"] = '"' .. version .. '"' })
        if n % threads == index then
          local guard = { ["Authorization"] = "Bearer " .. u.token, ["Content-Type"] = "application/json",
            ["If-Match"] = '"@V@"' }
          local pre, post = halves("PATCH", task, guard, change, "@V@")
          guarded[#guarded + 1] = { pre = pre, post = post, version = version }
        end
      end
      n = n + 1
    end
  end
  if os.getenv("BENCH_FEED") then
    for line in io.lines(os.getenv("BENCH_FEED")) do
      local user, token, old, current = line:match("(%S+) (%S+) (%S+) (%S+)")
      local auth = { ["Authorization"] = "Bearer " .. token }
      local feed = "/api/" .. user .. "/changes?cursor="
      polls[#polls + 1] = wrk.format("GET", feed .. current, auth)
      behind[#behind + 1] = wrk.format("GET", feed .. old, auth)
    end
  end
  if os.getenv("BENCH_BIG") then
    for line in io.lines(os.getenv("BENCH_BIG")) do
      local user, token, cursor = line:match("(%S+) (%S+) (%S+)")
      local auth = { ["Authorization"] = "Bearer " .. token }
      local path = "/api/" .. user .. "/tasks?limit=20"
      big.page1 = wrk.format("GET", path, auth)
      big.keyset = wrk.format("GET", path .. "&cursor=" .. cursor, auth)
      big.offset = wrk.format("GET", path .. "&offset=980", auth)
    end
  end
  health = wrk.format("GET", "/health")
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 1000)
  counter = math.random(1, #gets)
  key_prefix = "wrk-" .. os.time() .. "-" .. index .. "-" .. math.random(1, 1000000000) .. "-"
end

-- Consecutive requests go to different users.
local function pick(t)
  return t[(counter % #t) + 1]
end

-- wrk calls request() once before the run to check the script (script_verify_request in
-- wrk.c) and throws that request away: answer it without advancing any state, or the
-- version bookkeeping of patch-if-match would run one ahead for one task.
local verified = false

function request()
  if not verified then
    verified = true
    return health
  end
  counter = counter + 1
  if scenario == "list" then return pick(lists)
  elseif scenario == "get" then return pick(gets)
  elseif scenario == "create" then return pick(creates)
  elseif scenario == "patch" then return pick(patches)
  elseif scenario == "health" then return health
  elseif scenario == "get304" then return pick(not_modified)
  elseif scenario == "patch-if-match" then
    -- This thread alone patches these tasks, each again only after all its others, so
    -- the version it names is the current one.
    local task = pick(guarded)
    local request = task.pre .. task.version .. task.post
    task.version = task.version + 1
    return request
  elseif scenario == "changes-poll" then return pick(polls)
  elseif scenario == "changes-20" then return pick(behind)
  elseif scenario == "list-sorted" then return pick(sorted)
  elseif scenario == "list-search" then return pick(searched)
  elseif scenario == "page1" then return big.page1
  elseif scenario == "page50-keyset" then return big.keyset
  elseif scenario == "page50-offset" then return big.offset
  elseif scenario == "create-key" then
    local halves = pick(keyed)
    return halves.pre .. key_prefix .. counter .. halves.post
  else
    local r = math.random(100)
    if r <= 40 then return pick(lists)
    elseif r <= 80 then return pick(gets)
    elseif r <= 90 then return pick(patches)
    else return pick(creates) end
  end
end

function done(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format("RESULT %.0f %.2f %.2f %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    non2xx, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
