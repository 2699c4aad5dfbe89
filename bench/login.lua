-- wrk -s bench/login.lua http://HOST/auth/login -- EMAIL PASSWORD: each request logs in.
function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  wrk.body = string.format('{"email": "%s", "password": "%s"}', args[1], args[2])
end
