-- Argo CD health check for kubelora.dev/LoRAFineTune (resource.customizations key
-- "kubelora.dev_LoRAFineTune"). It reads the operator's conditions (operator/kubelora_operator/
-- conditions.py), never guesses from pods:
--   Succeeded=True                         -> Healthy   (the adapter was delivered)
--   Failed=True                            -> Degraded  (WorkerFailed, BackoffLimitExceeded, DeadlineExceeded, ApiError, ...)
--   Validated=False                        -> Degraded  (InvalidSpec, SecretNotFound, PVCNotFound, ConfigMapNotFound)
--   Suspended=True                         -> Suspended (spec.suspend: true, pods removed, checkpoints kept)
--   Scheduled=False reason NoMatchingNodes -> Degraded  (no node can ever take the workers as the cluster is now)
--   anything else (no status yet, pending, starting, running, restarting) -> Progressing, with the progress
hs = {}

local function conditions(o)
  local byType = {}
  if o.status ~= nil and o.status.conditions ~= nil then
    for _, c in ipairs(o.status.conditions) do
      if c.type ~= nil then
        byType[c.type] = c
      end
    end
  end
  return byType
end

local function is(c, status)
  return c ~= nil and c.status == status
end

local function describe(c)
  local text = c.reason or c.type
  if c.message ~= nil and c.message ~= "" then
    text = text .. ": " .. c.message
  end
  return text
end

local function progress(o)
  local p = o.status and o.status.progress
  if p == nil then
    return nil
  end
  local parts = {}
  if p.percent ~= nil then
    table.insert(parts, tostring(p.percent) .. "%")
  end
  if p.step ~= nil and p.totalSteps ~= nil then
    table.insert(parts, "step " .. tostring(p.step) .. "/" .. tostring(p.totalSteps))
  end
  if p.trainLoss ~= nil then
    table.insert(parts, "loss " .. string.format("%.4g", p.trainLoss))
  end
  if p.etaSeconds ~= nil then
    table.insert(parts, "eta " .. tostring(p.etaSeconds) .. "s")
  end
  if #parts == 0 then
    return nil
  end
  return table.concat(parts, ", ")
end

local c = conditions(obj)

if obj.status == nil or next(c) == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubelora operator to validate the resource"
  return hs
end

if is(c.Succeeded, "True") then
  hs.status = "Healthy"
  local uri = obj.status.artifact and obj.status.artifact.uri
  hs.message = "Succeeded" .. (uri and (": adapter at " .. uri) or "")
  return hs
end

if is(c.Failed, "True") then
  hs.status = "Degraded"
  hs.message = "Failed: " .. describe(c.Failed)
  return hs
end

if is(c.Validated, "False") then
  hs.status = "Degraded"
  hs.message = "Invalid: " .. describe(c.Validated)
  return hs
end

if is(c.Suspended, "True") then
  hs.status = "Suspended"
  hs.message = describe(c.Suspended)
  return hs
end

if is(c.Scheduled, "False") and c.Scheduled.reason == "NoMatchingNodes" then
  hs.status = "Degraded"
  hs.message = describe(c.Scheduled)
  return hs
end

hs.status = "Progressing"
local phase = obj.status.phase or "Pending"
local detail = nil
if is(c.Running, "True") then
  detail = progress(obj) or describe(c.Running)
elseif c.Running ~= nil then
  detail = describe(c.Running)
elseif c.Scheduled ~= nil then
  detail = describe(c.Scheduled)
elseif c.Validated ~= nil then
  detail = describe(c.Validated)
end
hs.message = phase .. (detail and (": " .. detail) or "")
return hs
