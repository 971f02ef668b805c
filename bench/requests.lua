-- wrk script: rotates through the seeded users and their tokens.
-- Usage: wrk ... -s bench/requests.lua <url> -- <scenario>
-- Scenarios: list, get, create, patch, mixed (40% list, 40% get, 10% patch, 10% create), health.
-- Reads "user token first_task_id" lines from the file named by BENCH_USERS.
-- Every request is formatted once, in init: building strings per request would make the
-- load generator, which shares the machine, take CPU the server and database need.

local scenario
local counter = 0
local TASKS_PER_USER = 20
local lists, gets, creates, patches = {}, {}, {}, {}
local health

function init(args)
  scenario = args[1] or "list"
  for line in io.lines(os.getenv("BENCH_USERS")) do
    local user, token, first = line:match("(%S+) (%S+) (%S+)")
    local path = "/api/" .. user .. "/tasks"
    local auth = { ["Authorization"] = "Bearer " .. token }
    local json = { ["Authorization"] = "Bearer " .. token, ["Content-Type"] = "application/json" }
    lists[#lists + 1] = wrk.format("GET", path .. "?limit=20", auth)
    creates[#creates + 1] = wrk.format("POST", path, json,
      '{"title": "benchmark task", "description": "made by wrk"}')
    for i = 0, TASKS_PER_USER - 1 do
      local task = path .. "/" .. (tonumber(first) + i)
      gets[#gets + 1] = wrk.format("GET", task, auth)
      patches[#patches + 1] = wrk.format("PATCH", task, json,
        '{"complete": ' .. ((i % 2 == 0) and "true" or "false") .. '}')
    end
  end
  health = wrk.format("GET", "/health")
  math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16) % 1000)
  counter = math.random(1, #gets)
end

-- Consecutive requests go to different users; gets and patches walk each user's tasks.
local function pick(t)
  return t[(counter % #t) + 1]
end

function request()
  counter = counter + 1
  if scenario == "list" then return pick(lists)
  elseif scenario == "get" then return pick(gets)
  elseif scenario == "create" then return pick(creates)
  elseif scenario == "patch" then return pick(patches)
  elseif scenario == "health" then return health
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
