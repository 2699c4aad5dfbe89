-- wrk -s bench/login.lua http://HOST/auth/login -- EMAIL PASSWORD: each request logs in.
-- A 503 is a login shed because too many wait for bcrypt: expected under a
-- flood, so it is counted apart; any other non-200 is an error.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = string.format('{"email": "%s", "password": "%s"}', args[1], args[2])
  shed, unexpected = 0, 0
end

function response(status, headers, body)
  if status == 503 then
    shed = shed + 1
  elseif status ~= 200 then
    unexpected = unexpected + 1
  end
end

function done(summary, latency, requests)
  local total_shed, total_unexpected = 0, 0
  for _, thread in ipairs(threads) do
    total_shed = total_shed + thread:get("shed")
    total_unexpected = total_unexpected + thread:get("unexpected")
  end
  io.write(string.format("Shed responses: %d\nUnexpected responses: %d\n",
                         total_shed, total_unexpected))
end
