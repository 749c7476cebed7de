"""The one message type every platform adapter hands the bot, and what comes back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(frozen=True)
class IncomingMessage:
    platform: str  # "console", "discord", "line"
    chat_id: str  # the platform's conversation: a channel, a DM, a LINE group, a 1:1 user
    user_id: str  # who wrote it, as the platform identifies them
    user_name: str  # the name the persona sees in the conversation
    text: str
    addressed: bool  # the adapter's verdict: a mention, a DM, a reply to the bot, a LINE 1:1
    received: float = field(default_factory=time.monotonic)

    @property
    def chat_key(self) -> str:
        """Memory and limits are per conversation across platforms: `discord:1234`, `line:Cabc`."""
        return f"{self.platform}:{self.chat_id}"

    @property
    def user_key(self) -> str:
        return f"{self.platform}:{self.user_id}"
