"""Chat turns as every chat template expects them: a list of {"role": str, "content": str}.

Accepted in a record, besides a plain string content:
- content given as null: an empty turn (OpenAI writes null for an assistant turn that only calls tools);
- content given as a list of text parts, OpenAI style ([{"type": "text", "text": ...}], or plain strings),
  joined with newlines as vLLM joins them for a text-only model;
- ShareGPT turns {"from": "human" | "gpt" | "system" | ..., "value": ...}, mapped to chat roles.

Anything else (an image part, a number, a missing role, tool calls) is refused with the record's file and
line and the path of the field (`messages[2].content[1]`).
"""

from __future__ import annotations

from ..errors import PissaError

# ShareGPT speaker -> chat role (the names ShareGPT, LLaMA-Factory and axolotl data use).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "observation": "tool"}


def text_of(content, where: str, field: str) -> str:
    """A turn's content as one string: a string, null (""), or a list of text parts joined with newlines."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise PissaError(f"{where}: {field} must be a string, null or a list of text parts, got "
                         f"{type(content).__name__}")
    texts = []
    for i, part in enumerate(content):
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif isinstance(part, dict):
            kind = part.get("type", "text")
            raise PissaError(f"{where}: {field}[{i}] is a part of type {kind!r}; only text parts "
                             "({\"type\": \"text\", \"text\": ...}) are supported: drop the other parts")
        else:
            raise PissaError(f"{where}: {field}[{i}] must be a text part or a string, got {type(part).__name__}")
    return "\n".join(texts)


def chat_turns(turns, where: str, field: str = "messages") -> list[dict]:
    """`messages` ([{role, content}]) or ShareGPT `conversations` ([{from, value}]) as chat turns."""
    if not isinstance(turns, list) or not turns:
        raise PissaError(f"{where}: field {field!r} must be a non-empty list of turns")
    return [_turn(turn, where, f"{field}[{i}]") for i, turn in enumerate(turns)]


def _turn(turn, where: str, field: str) -> dict:
    if not isinstance(turn, dict):
        raise PissaError(f"{where}: {field} must be an object with role and content, got {type(turn).__name__}")
    if turn.get("tool_calls"):
        raise PissaError(f"{where}: {field} has tool_calls, which pissa train does not support yet; "
                         "drop the record or the tool turns")
    if "from" in turn and "role" not in turn:  # ShareGPT
        speaker = turn["from"]
        if speaker not in SHAREGPT_ROLES:
            raise PissaError(f"{where}: {field}.from is {speaker!r}; expected one of {', '.join(SHAREGPT_ROLES)}")
        return {"role": SHAREGPT_ROLES[speaker], "content": text_of(turn.get("value"), where, f"{field}.value")}
    role = turn.get("role")
    if not isinstance(role, str) or not role:
        raise PissaError(f"{where}: {field} is missing field 'role' (a string such as user or assistant)")
    if "content" not in turn:
        raise PissaError(f"{where}: {field} is missing field 'content'")
    return {"role": role, "content": text_of(turn["content"], where, f"{field}.content")}


def assistant_turns(turns: list[dict]) -> int:
    return sum(t["role"] == "assistant" for t in turns)


def split_last_answer(turns: list[dict], where: str, field: str) -> tuple[list[dict], dict]:
    """(turns before the answer, the answer): the last turn must be the assistant's, after a prompt turn."""
    if turns[-1]["role"] != "assistant":
        raise PissaError(f"{where}: the last turn of {field!r} must have role 'assistant' (the response to "
                         f"learn), got {turns[-1]['role']!r}")
    if len(turns) < 2:
        raise PissaError(f"{where}: {field!r} needs at least one prompt turn before the assistant's answer")
    if not any(t["content"].strip() for t in turns if t["role"] == "assistant"):
        raise PissaError(f"{where}: every assistant turn of {field!r} is empty; there is nothing to learn")
    return turns[:-1], turns[-1]
