//! What the assistant says on its own, in one place: command replies, the help text and
//! the short apologies a chatter sees instead of silence.

/// Reply to `/help`.
pub(crate) const HELP: &str = "我是 AI 助手，直接发消息提问即可，我会记住本次对话的上下文。\n\
发送 /reset（或“重置”“清空”）清空对话记忆，/help 查看本说明。\n\
I'm an AI assistant: just ask. Send /reset to clear our conversation, /help for this text.";

/// Reply to `/reset`.
pub(crate) const RESET_DONE: &str = "好的，对话记忆已清空。(Conversation cleared.)";

/// Reply to a message the assistant cannot read.
pub(crate) const UNSUPPORTED: &str = "抱歉，我目前只能理解文字和语音消息，请用文字描述您的问题。\
(Sorry, I can only read text and voice messages for now.)";

/// Reply when the model failed after retries.
pub(crate) const MODEL_FAILED: &str = "抱歉，我暂时无法回答，请稍后再试。\
(Sorry, I can't answer right now. Please try again in a moment.)";

/// Reply when the model's limits would make the answer too late (`[limits] max_wait_secs`).
pub(crate) const BUSY: &str = "现在提问的人太多，请稍后再试。\
(I'm busy right now. Please try again shortly.)";

/// Sent once when an answer takes longer than the bot's `working_notice_secs`.
pub(crate) const WORKING: &str = "正在思考，请稍候…… (Working on it, one moment…)";

/// Sent when a message is given up after every retry.
pub(crate) const GAVE_UP: &str = "抱歉，这条消息多次处理失败，已经放弃，请稍后重新发送。\
(Sorry, I could not deliver an answer to that message. Please send it again later.)";

/// A chat command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// Forget the conversation.
    Reset,
    /// Explain how to use the bot.
    Help,
    /// The bot's limits and their use (admins only).
    Status,
}

/// The command `text` is, if any. An empty message asks for help.
pub(crate) fn command(text: &str) -> Option<Command> {
    let t = text.trim();
    match t.to_ascii_lowercase().as_str() {
        "/reset" | "重置" | "清空" | "/clear" => Some(Command::Reset),
        "/help" | "帮助" | "" => Some(Command::Help),
        "/status" | "状态" => Some(Command::Status),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_recognised() {
        assert_eq!(command(" /reset "), Some(Command::Reset));
        assert_eq!(command("/RESET"), Some(Command::Reset));
        assert_eq!(command("重置"), Some(Command::Reset));
        assert_eq!(command("清空"), Some(Command::Reset));
        assert_eq!(command("/help"), Some(Command::Help));
        assert_eq!(command(""), Some(Command::Help));
        assert_eq!(command("/status"), Some(Command::Status));
        assert_eq!(command("reset my password please"), None);
    }
}
