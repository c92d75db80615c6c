-- wrk script: GET each path of the file named by env PATHS in turn, so that
-- one run covers many patients, codes and names instead of one hot URL.
local paths = {}
local i = 0
init = function(args)
  for line in io.lines(os.getenv("PATHS")) do
    paths[#paths + 1] = line
  end
  i = math.random(#paths)
end
request = function()
  i = i % #paths + 1
  return wrk.format("GET", paths[i])
end
