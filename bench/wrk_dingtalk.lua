-- wrk script: signed DingTalk robot callbacks, each with a unique msgId (a repeated msgId
-- would measure the dedupe path). TIMESTAMP and SIGN come from the environment: the sign
-- depends only on timestamp + secret, so one pair stays valid for an hour.
local ts = os.getenv("TIMESTAMP")
local sign = os.getenv("SIGN")
local threads = 0
local counter = 0

function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end

function request()
  counter = counter + 1
  local n = counter % 1000
  local body = string.format(
    '{"msgtype":"text","text":{"content":" hello"},"msgId":"wrk-%d-%d","createAt":1700000000000,' ..
    '"conversationType":"1","conversationId":"cid-wrk-%d","senderId":"$:LWCP_v1:$%d",' ..
    '"senderStaffId":"staff-%d","senderNick":"bench","robotCode":"bench-app",' ..
    '"sessionWebhook":"http://127.0.0.1:9/robot/sendBySession?session=x",' ..
    '"sessionWebhookExpiredTime":4102444800000}',
    tid or 0, counter, n, n, n)
  return wrk.format("POST", "/dingtalk/bench",
    { ["timestamp"] = ts, ["sign"] = sign, ["Content-Type"] = "application/json" }, body)
end
