"""Chat messages written down as a transcript a character model can continue.

A character model knows no roles: a conversation becomes text in the layout of its training corpus,
one message after another (CHARGEN_CHAT_TEMPLATE, by default a play's `NAME:\\nspeech\\n\\n`, with
each role's speaker name from CHARGEN_CHAT_NAMES), and then the start of the assistant's message,
which the model continues. The reply ends where the next message would begin: the template's text
after {content} followed by its text before {name} (by default "\\n\\n", the blank line before the
next speaker), a stop sequence the reply does not include.

A transcript longer than CHARGEN_MAX_TRANSCRIPT_CHARS keeps its end (the oldest turns are cut, as a
context window would). The end of every message is a boundary where the prompt cache keeps the
state, so the next turn of the conversation (the same messages, the reply, a new message) resumes
after the previous transcript and feeds only what is new.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.records.vocab import normalize_newlines


@dataclass(frozen=True)
class Transcript:
    text: str
    cache_at: tuple[int, ...]  # where each message ends, inside the text
    cut: int  # characters cut from the start (0 unless the transcript was too long)


@dataclass(frozen=True)
class ChatTemplate:
    template: str  # holds {content} once, and {name} (before it) or not
    names: dict[str, str]  # role -> speaker name
    max_chars: int

    @property
    def stop(self) -> str:
        """Where the next message would begin after the reply ("" when the template marks none)."""
        before, after = self.template.split("{content}")
        return after.replace("{name}", self.names["assistant"]) + before.split("{name}")[0]

    def opening(self, name: str) -> str:
        return self.template.split("{content}")[0].replace("{name}", name)

    def closing(self, name: str) -> str:
        return self.template.split("{content}")[1].replace("{name}", name)

    def render(self, messages: list[tuple[str, str, str | None]]) -> Transcript:
        """The transcript of (role, text, speaker name or None) messages, ending with the opening of
        the assistant's reply. A message's name, when it has one, replaces its role's."""
        parts, ends, at = [], [], 0
        for role, text, name in messages:
            name = name or self.names[role]
            part = self.opening(name) + normalize_newlines(text) + self.closing(name)
            parts.append(part)
            at += len(part)
            ends.append(at)
        parts.append(self.opening(self.names["assistant"]))
        text = "".join(parts)
        cut = max(0, len(text) - self.max_chars)
        return Transcript(text[cut:], tuple(e - cut for e in ends if cut < e < len(text)), cut)
