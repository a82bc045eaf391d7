-- wrk script: signed DingTalk robot callbacks, each with a unique msgId (a repeated msgId
-- would be a platform retry, which the worker drops). msgIds carry a per-run id, so a warm-up run against the
-- same server never makes the measured run's callbacks duplicates. TIMESTAMP and SIGN come from the environment: the sign
-- depends only on timestamp + secret, so one pair stays valid for an hour.
local ts = os.getenv("TIMESTAMP")
local sign = os.getenv("SIGN")
local threads = 0
local counter = 0
math.randomseed(os.time())
local run_id = string.format("%d%06d", os.time(), math.random(0, 999999))

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
  thread:set("run", run_id)
end

function request()
  counter = counter + 1
  local n = counter % 1000
  local body = string.format(
    '{"msgtype":"text","text":{"content":" hello"},"msgId":"wrk-%s-%d-%d","createAt":1700000000000,' ..
    '"conversationType":"1","conversationId":"cid-wrk-%d","senderId":"$:LWCP_v1:$%d",' ..
    '"senderStaffId":"staff-%d","senderNick":"bench","robotCode":"bench-app",' ..
    '"sessionWebhook":"http://127.0.0.1:9/robot/sendBySession?session=x",' ..
    '"sessionWebhookExpiredTime":4102444800000}',
    run or "0", tid or 0, counter, n, n, n)
  return wrk.format("POST", "/dingtalk/bench",
    { ["timestamp"] = ts, ["sign"] = sign, ["Content-Type"] = "application/json" }, body)
end
