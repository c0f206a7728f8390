"""Conversation formats: how one conversation becomes training samples and chat prompts.

One class per format (`chatglm`, `moss`, `chat_template`), all behind `base.ConversationFormat`;
training (`peftchat.data`) and inference (`peftchat.infer`) both use them, so a chat prompt is
built by the same code, with the same truncation rules, as the training samples.

* `conversation.Conversation`   the one shape of a conversation or a chat history
* `samples`                     `Sample`, `Encoded`, `IGNORE_INDEX`, `encode_text`
* `base.ConversationFormat`     the interface: `encode`, `prompt`, `stop_ids`, `parse_reply`,
                                `add_round`, `reply_stream`, `sample_limit`
* `registry.make_format`        the recipe's format by name: the only place naming the formats

This package imports `config` and `errors` only; nothing heavy is loaded at import.
"""
