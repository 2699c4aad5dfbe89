-- wrk -s bench/create_task.lua http://HOST/projects/ID/tasks: each request creates a task.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"title": "Created by the benchmark", "status": "in_progress"}'
