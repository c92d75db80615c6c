-- wrk script: POST /exchange/documents, each request a different signed
-- document from the list in the environment variable EXCHANGE_DOCS (one path
-- per line). Thread k of T sends documents k, k+T, k+2T, ...; once its share
-- is used up it starts again, and a resubmitted document is answered 200
-- (already stored) instead of 201, so the two are counted apart.
local threads = {}

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local list = io.open(os.getenv("EXCHANGE_DOCS")):read("*a")
  docs, i, stored, again, failed = {}, 0, 0, 0, 0
  local n = 0
  for path in list:gmatch("[^\n]+") do
    if n % tonumber(os.getenv("EXCHANGE_THREADS")) == id then
      local f = io.open(path, "rb")
      table.insert(docs, f:read("*a"))
      f:close()
    end
    n = n + 1
  end
  headers = { ["Content-Type"] = "application/xml" }
end

function request()
  i = i % #docs + 1
  return wrk.format("POST", "/exchange/documents", headers, docs[i])
end

function response(status, headers, body)
  if status == 201 then stored = stored + 1
  elseif status == 200 then again = again + 1
  else failed = failed + 1 end
end

function done(summary, latency, requests)
  local s, a, f = 0, 0, 0
  for _, t in ipairs(threads) do
    s, a, f = s + t:get("stored"), a + t:get("again"), f + t:get("failed")
  end
  local secs = summary.duration / 1e6
  io.write(string.format("documents stored (201): %d = %.1f documents/s\n", s, s / secs))
  io.write(string.format("resubmissions answered 200: %d, failures: %d\n", a, f))
  io.write(string.format("latency p50 %.1f ms, p90 %.1f ms, p99 %.1f ms\n",
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000))
end
