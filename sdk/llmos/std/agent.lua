-- agent: an agent library for Lua programs on llmos, in the userland standard library
-- (docs/userland-library.md; the Python twin is llmos/std/agent.py):
--
--   local agent = require "agent"
--
--   local calc = agent.new{
--     system = "You are a careful assistant.",
--     tools = {agent.tools.read_file(), agent.tools.write_file(), {
--       name = "add", description = "Add two numbers",
--       parameters = {type = "object", properties = {a = {type = "number"}, b = {type = "number"}},
--                     required = {"a", "b"}},
--       run = function(args) return args.a + args.b end,    -- the program's own function
--     }},
--     max_steps = 6, token_budget = 4000, memory = "memory/calc.json",
--   }
--   local out = calc:run("What is 2 + 3?")   -- {answer, steps, tokens, stopped, calls}
--   local pick = agent.decide("Is 5 prime?", {"yes", "no"})   -- {choice, reason}
--
-- The loop: the model sees the system text, the notes of earlier runs (memory), the task and
-- the tools; each step it answers or calls tools (the kernel constrains calls so that their
-- arguments validate against the tool's schema); each call's result (or error) goes back as a
-- `tool` message. It stops at an answer, after max_steps (the last step may not call tools),
-- or when the token budget is spent. The conversation lives in a context (sys.context), so
-- each step prefills only its new messages; the budget counts the tokens each step computes:
-- prompt tokens not served from the cache, plus completion tokens.

local agent = {}

-- -- JSON: tool results go back to the model as JSON text; memory is a JSON file ------------
local json = {}
agent.json = json

local ESCAPES = {['"'] = '\\"', ["\\"] = "\\\\", ["\b"] = "\\b", ["\f"] = "\\f", ["\n"] = "\\n",
                 ["\r"] = "\\r", ["\t"] = "\\t"}

local function is_array(t)
  local n = 0
  for k in pairs(t) do
    if math.type(k) ~= "integer" or k < 1 then return false end
    n = math.max(n, k)
  end
  return n > 0 or next(t) == nil and getmetatable(t) == json.array_mt, n
end

json.array_mt = {}  -- setmetatable({}, agent.json.array_mt): an empty array, not an object

function json.encode(value)
  local kind = type(value)
  if value == nil then return "null" end
  if kind == "boolean" then return tostring(value) end
  if kind == "number" then
    if value ~= value or value == math.huge or value == -math.huge then return "null" end
    if math.type(value) == "integer" then return tostring(value) end
    return string.format("%.17g", value)
  end
  if kind == "string" then
    return '"' .. value:gsub('[%c"\\]', function(c)
      return ESCAPES[c] or string.format("\\u%04x", c:byte())
    end) .. '"'
  end
  if kind == "table" then
    local array, n = is_array(value)
    local parts = {}
    if array then
      for i = 1, n or 0 do parts[i] = json.encode(value[i]) end
      return "[" .. table.concat(parts, ",") .. "]"
    end
    local keys = {}
    for k in pairs(value) do keys[#keys + 1] = tostring(k) end
    table.sort(keys)
    for i, k in ipairs(keys) do
      local v = value[k]
      if v == nil then v = value[tonumber(k)] end
      parts[i] = json.encode(k) .. ":" .. json.encode(v)
    end
    return "{" .. table.concat(parts, ",") .. "}"
  end
  return json.encode(tostring(value))
end

function json.decode(text)
  local pos = 1
  local function fail(what) error(string.format("json: %s at character %d", what, pos), 0) end
  local function space() pos = text:find("[^ \t\r\n]", pos) or #text + 1 end
  local value
  local function str()
    local out, i = {}, pos + 1
    while true do
      local j = text:find('["\\]', i)
      if not j then fail("unterminated string") end
      out[#out + 1] = text:sub(i, j - 1)
      if text:sub(j, j) == '"' then pos = j + 1; return table.concat(out) end
      local e = text:sub(j + 1, j + 1)
      if e == "u" then
        out[#out + 1] = utf8.char(tonumber(text:sub(j + 2, j + 5), 16) or fail("bad \\u escape"))
        i = j + 6
      else
        local map = {b = "\b", f = "\f", n = "\n", r = "\r", t = "\t"}
        out[#out + 1] = map[e] or e
        i = j + 2
      end
    end
  end
  value = function()
    space()
    local c = text:sub(pos, pos)
    if c == "{" then
      local out = {}
      pos = pos + 1; space()
      if text:sub(pos, pos) == "}" then pos = pos + 1; return out end
      while true do
        space()
        if text:sub(pos, pos) ~= '"' then fail("expected a key") end
        local k = str(); space()
        if text:sub(pos, pos) ~= ":" then fail("expected ':'") end
        pos = pos + 1
        out[k] = value(); space()
        local d = text:sub(pos, pos); pos = pos + 1
        if d == "}" then return out end
        if d ~= "," then fail("expected ',' or '}'") end
      end
    elseif c == "[" then
      local out = setmetatable({}, json.array_mt)
      pos = pos + 1; space()
      if text:sub(pos, pos) == "]" then pos = pos + 1; return out end
      while true do
        out[#out + 1] = value(); space()
        local d = text:sub(pos, pos); pos = pos + 1
        if d == "]" then return out end
        if d ~= "," then fail("expected ',' or ']'") end
      end
    elseif c == '"' then
      return str()
    end
    for word, v in pairs{["true"] = true, ["false"] = false} do
      if text:sub(pos, pos + #word - 1) == word then pos = pos + #word; return v end
    end
    if text:sub(pos, pos + 3) == "null" then pos = pos + 4; return nil end
    local num = text:match("^-?%d+%.?%d*[eE]?[-+]?%d*", pos)
    if not num or num == "" then fail("unexpected character") end
    pos = pos + #num
    return math.tointeger(tonumber(num)) or tonumber(num)
  end
  local out = value(); space()
  if pos <= #text then fail("trailing text") end
  return out
end
-- -- tools that are syscalls -------------------------------------------------------------------
local MAX_READ = 4000  -- bytes of a file shown to the model

local function object(properties, required)  -- no other keys: the model's output ends where it should
  return {type = "object", properties = properties, required = required, additionalProperties = false}
end

agent.tools = {}

function agent.tools.read_file()
  return {name = "read_file", description = "Read a text file of the namespace's file store",
          parameters = object({path = {type = "string"}}, {"path"}),
          run = function(args)
            local data = sys.fs.read(args.path)
            return #data > MAX_READ and data:sub(1, MAX_READ) .. "\n[cut]" or data
          end}
end

function agent.tools.write_file()
  return {name = "write_file", description = "Write a text file in the namespace's file store",
          parameters = object({path = {type = "string"}, content = {type = "string"}}, {"path", "content"}),
          run = function(args)
            return {written = sys.fs.write(args.path, args.content).size}
          end}
end

function agent.tools.list_files()
  return {name = "list_files", description = "List a directory of the namespace's file store ('' is the root)",
          parameters = object({path = {type = "string"}}, {"path"}),
          run = function(args)
            local names = {}
            for i, f in ipairs(sys.fs.list(args.path)) do names[i] = f.path .. (f.is_dir and "/" or "") end
            return names
          end}
end

-- A sub-agent: `spec` is how to spawn it (path= or lua=, limits=, ...); it gets {task=TASK} as
-- its args, and its result is the tool's.
function agent.tools.spawn_agent(spec)
  return {name = "spawn_agent", description = spec.description or "Give a task to a sub-agent and wait for its answer",
          parameters = object({task = {type = "string"}}, {"task"}),
          run = function(args)
            local child = {args = {task = args.task}}
            for k, v in pairs(spec) do if k ~= "description" then child[k] = v end end
            local info = sys.wait(sys.spawn(child), spec.timeout_ms or 120000)
            if info == nil then error("the sub-agent did not finish in time") end
            if info.exit_reason ~= "normal" then error("the sub-agent ended: " .. tostring(info.error or info.exit_reason)) end
            return info.result
          end}
end

function agent.tools.send()
  return {name = "send", description = "Send a message to a process (by pid or registered name)",
          parameters = object({to = {type = "string"}, text = {type = "string"}}, {"to", "text"}),
          run = function(args)
            return {message_id = sys.send(math.tointeger(tonumber(args.to)) or args.to, args.text, {tag = "agent"})}
          end}
end

function agent.tools.receive()
  return {name = "receive", description = "Take the next message sent to this agent, waiting up to a second",
          parameters = object({}, nil),
          run = function()
            local m = sys.recv{tag = "agent", timeout_ms = 1000}
            return m and {from = m.from, text = m.body} or {none = true}
          end}
end

-- -- memory: notes of earlier runs, in the namespace's file store -------------------------------
local MEMORY_NOTES = 8  -- the most recent runs remembered

function agent.load_memory(path)
  local ok, data = pcall(sys.fs.read, path)
  if not ok then return {} end
  local ok2, notes = pcall(json.decode, data)
  return ok2 and type(notes) == "table" and notes or {}
end

function agent.save_memory(path, notes)
  while #notes > MEMORY_NOTES do table.remove(notes, 1) end
  sys.fs.write(path, json.encode(setmetatable(notes, json.array_mt)))
end

-- -- the loop ------------------------------------------------------------------------------------
local Agent = {}
Agent.__index = Agent

function agent.new(opts)
  local self = setmetatable({
    system = opts.system or "You are a helpful assistant. Use the tools when they help.",
    max_steps = opts.max_steps or 6,
    token_budget = opts.token_budget or 6000,
    max_tokens = opts.max_tokens or 200,
    temperature = opts.temperature or 0,
    first_tool_choice = opts.first_tool_choice or "auto",  -- "required": the first step calls a tool
    memory = opts.memory,
    tools = {}, schemas = {},
  }, Agent)
  for _, tool in ipairs(opts.tools or {}) do
    self.tools[tool.name] = tool
    self.schemas[#self.schemas + 1] = {name = tool.name, description = tool.description, parameters = tool.parameters}
  end
  return self
end

function Agent:run(task)
  local notes = self.memory and agent.load_memory(self.memory) or {}
  local system = self.system
  if #notes > 0 then
    local lines = {}
    for i, n in ipairs(notes) do lines[i] = "- " .. tostring(n.task) .. " => " .. tostring(n.answer) end
    system = system .. "\n\nNotes from earlier runs:\n" .. table.concat(lines, "\n")
  end
  local ctx = sys.context.create{messages = {{role = "system", content = system}},
                                 tools = #self.schemas > 0 and self.schemas or nil}
  local out = {steps = 0, tokens = 0, calls = {}, stopped = "steps"}
  local turn = {{role = "user", content = task}}
  for step = 1, self.max_steps do
    local left = self.token_budget - out.tokens
    if left <= 0 then out.stopped = "budget"; break end
    local choice = step == self.max_steps and "none" or step == 1 and self.first_tool_choice or "auto"
    if #self.schemas == 0 then choice = nil end
    local r = sys.infer{context = ctx, messages = turn, tool_choice = choice,
                        max_tokens = math.min(self.max_tokens, left), temperature = self.temperature}
    out.steps = step
    out.tokens = out.tokens + r.usage.prompt_tokens - r.usage.cached_tokens + r.usage.completion_tokens
    local calls = r.tool_calls or {}
    if #calls == 0 then
      out.answer, out.stopped = r.text, r.finish_reason == "stop" and "answer" or r.finish_reason
      break
    end
    turn = {}
    for _, call in ipairs(calls) do
      local tool = self.tools[call.name]  -- the kernel lets the model call only these
      local ok, result = pcall(tool.run, call.arguments, self)
      if not ok then result = {error = tostring(result)} end
      out.calls[#out.calls + 1] = {name = call.name, arguments = call.arguments, ok = ok, result = result}
      turn[#turn + 1] = {role = "tool", name = call.name, content = json.encode(result)}
    end
  end
  sys.context.drop(ctx)
  if self.memory then
    notes[#notes + 1] = {task = task, answer = out.answer or ("(stopped: " .. out.stopped .. ")")}
    agent.save_memory(self.memory, notes)
  end
  return out
end

-- -- structured outputs --------------------------------------------------------------------------
-- The model's answer to `messages` as a value matching the JSON schema (nil and the reason if
-- it ran out of tokens first).
function agent.structured(messages, schema, opts)
  opts = opts or {}
  local r = sys.infer{messages = messages, json_schema = schema, max_tokens = opts.max_tokens or 300,
                      temperature = opts.temperature or 0}
  if r.json == nil then return nil, "the output was cut at " .. r.usage.completion_tokens .. " tokens" end
  return r.json
end

-- A decision among `options` (strings), with a short reason: {choice, reason}.
function agent.decide(question, options, opts)
  local schema = object({choice = {enum = options}, reason = {type = "string", maxLength = 200}}, {"choice", "reason"})
  return agent.structured({{role = "system", content = "Answer with a JSON object."},
                           {role = "user", content = question}}, schema, opts)
end

return agent
