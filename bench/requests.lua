-- wrk script: rotates through the seeded users and their tokens.
-- Usage: wrk ... -s bench/requests.lua <url> -- <scenario>
-- Scenarios: list, get, create, patch, mixed (40% list, 40% get, 10% patch, 10% create), health.
-- Reads "user token first_task_id" lines from the file named by BENCH_USERS.

local users = {}
local scenario
local counter = 0
local TASKS_PER_USER = 20

function init(args)
  scenario = args[1] or "list"
  for line in io.lines(os.getenv("BENCH_USERS")) do
    local user, token, first = line:match("(%S+) (%S+) (%S+)")
    users[#users + 1] = {
      path = "/api/" .. user .. "/tasks",
      auth = "Bearer " .. token,
      first = tonumber(first),
    }
  end
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 1000)
  counter = math.random(1, #users)
end

local function list(u)
  return wrk.format("GET", u.path .. "?limit=20", { ["Authorization"] = u.auth })
end

local function get(u)
  local id = u.first + (counter % TASKS_PER_USER)
  return wrk.format("GET", u.path .. "/" .. id, { ["Authorization"] = u.auth })
end

local function create(u)
  return wrk.format("POST", u.path,
    { ["Authorization"] = u.auth, ["Content-Type"] = "application/json" },
    '{"title": "benchmark task", "description": "made by wrk"}')
end

local function patch(u)
  local id = u.first + (counter % TASKS_PER_USER)
  local done = (counter % 2 == 0) and "true" or "false"
  return wrk.format("PATCH", u.path .. "/" .. id,
    { ["Authorization"] = u.auth, ["Content-Type"] = "application/json" },
    '{"complete": ' .. done .. '}')
end

function request()
  counter = counter + 1
  local u = users[(counter % #users) + 1]
  if scenario == "list" then return list(u)
  elseif scenario == "get" then return get(u)
  elseif scenario == "create" then return create(u)
  elseif scenario == "patch" then return patch(u)
  elseif scenario == "health" then return wrk.format("GET", "/health")
  else
    local r = math.random(100)
    if r <= 40 then return list(u)
    elseif r <= 80 then return get(u)
    elseif r <= 90 then return patch(u)
    else return create(u) end
  end
end

function done(summary, latency, requests)
  local non2xx = summary.errors.status
  io.write(string.format("RESULT %.0f %.2f %.2f %d %d\n",
    summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    non2xx, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
