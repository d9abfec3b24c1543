-- planner_worker.lua: one sub-task of planner.lua: reads its file and returns the model's
-- answer as a structured result (a JSON schema makes it dependable): {file, summary, topics,
-- relevant}. args: {task, file}.
local agent = require "agent"
local text = sys.fs.read(args.file)
if #text > 3000 then text = text:sub(1, 3000) end
local schema = {
  type = "object",
  properties = {
    summary = {type = "string", minLength = 1, maxLength = 240},
    topics = {type = "array", items = {type = "string", minLength = 1, maxLength = 40}, minItems = 1, maxItems = 4},
    relevant = {type = "boolean"},
  },
  required = {"summary", "topics", "relevant"},
  additionalProperties = false,
}
local answer, why = agent.structured({
  {role = "system", content = "You are a careful reader. Answer with a JSON object."},
  {role = "user", content = "File " .. args.file .. ":\n\n" .. text .. "\n\nTask: " .. args.task},
}, schema, {max_tokens = 160})
if answer == nil then error("planner_worker: " .. why) end
answer.file = args.file
return answer
