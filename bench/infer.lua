-- wrk script for bench/bench.py: POST one fixed KServe v2 JSON infer body, count non-200
-- answers, and print one machine-readable result line when the run ends.
--
--   wrk -t1 -c8 -d10s --latency -s bench/infer.lua http://127.0.0.1:8000 -- \
--       /v2/models/tiny/infer /path/to/body.json
--
-- The body is read from a file (not passed inline) because a 256-float JSON body is too long
-- to be comfortable on a command line.

wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local threads = {}

-- Runs in the main Lua state once per thread: keep the handles so done() can read the
-- per-thread counters afterwards.
function setup(thread)
   table.insert(threads, thread)
end

-- Runs in each thread's own Lua state; wrk.init() formats the request right after this
-- returns, so the request stays static (no per-request Lua call to build it).
function init(args)
   local path = args[1]
   local body_file = args[2]
   if path == nil or body_file == nil then
      error("usage: -- <infer path> <body file>")
   end
   local f = assert(io.open(body_file, "rb"))
   wrk.body = f:read("*a")
   f:close()
   wrk.path = path
   responses = 0
   non200 = 0
   statuses = {}
end

function response(status, headers, body)
   responses = responses + 1
   if status ~= 200 then
      non200 = non200 + 1
      local key = tostring(status)
      statuses[key] = (statuses[key] or 0) + 1
   end
end

function done(summary, latency, requests)
   local responses_total = 0
   local non200_total = 0
   local by_status = {}
   for _, thread in ipairs(threads) do
      responses_total = responses_total + (thread:get("responses") or 0)
      non200_total = non200_total + (thread:get("non200") or 0)
      local statuses = thread:get("statuses") or {}
      for key, count in pairs(statuses) do
         by_status[key] = (by_status[key] or 0) + count
      end
   end
   local status_parts = {}
   for key, count in pairs(by_status) do
      table.insert(status_parts, string.format('"%s":%d', key, count))
   end
   local e = summary.errors
   -- One JSON object on one line behind a marker; latencies are wrk's microseconds.
   io.write(string.format(
      'NATRON_WRK_RESULT {"duration_us":%d,"requests":%d,"bytes":%d,"responses":%d,"non200":%d,' ..
      '"non200_by_status":{%s},"connect_errors":%d,"read_errors":%d,"write_errors":%d,' ..
      '"status_errors":%d,"timeout_errors":%d,"latency_min_us":%.1f,"latency_mean_us":%.1f,' ..
      '"latency_max_us":%.1f,"latency_p50_us":%.1f,"latency_p90_us":%.1f,"latency_p99_us":%.1f}\n',
      summary.duration, summary.requests, summary.bytes, responses_total, non200_total,
      table.concat(status_parts, ","), e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max,
      latency:percentile(50.0), latency:percentile(90.0), latency:percentile(99.0)))
end
