"""Multi-turn chat data: ShareGPT/Vicuna conversations (with glaive-style tool calls), OpenAI
``messages`` JSONL, and MT-Bench questions with reference answers.

Every conversation becomes ``Example.messages`` (role/content dicts); training takes the loss on
assistant turns only (``formatting.encode_conversation``). ``instruction`` holds the first user turn
and ``output`` the last assistant turn, so inspect/evaluate have something to show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.data.example import Example
from tunelab.data.formats.base import (
    BadRecord,
    LoadOptions,
    LoadReport,
    convert_records,
    items,
    jsonl_records,
    obj,
    strings,
    text,
)
from tunelab.data.formats.instruct import records_of

# ShareGPT speaker names seen in the wild -> chat-template roles. glaive/LLaMA-Factory tool data uses
# function_call (the assistant's call, supervised) and observation (the tool's answer, not supervised).
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "system": "system",
                  "function_call": "assistant", "observation": "tool", "tool": "tool"}
OPENAI_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
                "tool": "tool", "function": "tool"}


def chat_example(messages: list[dict[str, str]], *, id: str, task: str, meta: dict[str, Any] | None = None) -> Example:
    """An Example holding a conversation; it must contain at least one assistant turn to learn from."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    answers = [m["content"] for m in messages if m["role"] == "assistant"]
    if not answers:
        raise BadRecord("conversation has no assistant turn to learn from", "messages")
    return Example(id=id, task=task, instruction=users[0] if users else "", output=answers[-1],
                   messages=tuple(messages), meta=meta or {})


def _tools_message(tools: Any) -> list[dict[str, str]]:
    """Tool schemas go into a system message (the SmolLM2/ChatML templates have no tools slot)."""
    if tools in (None, "", "[]", []):
        return []
    if not isinstance(tools, str):
        tools = json.dumps(tools, ensure_ascii=False)
    return [{"role": "system", "content": f"Available functions (JSON schema):\n{tools}"}]


def sharegpt_example(record: Any, where: int, *, stem: str) -> Example:
    """``{id?, conversations: [{from, value}], system?, tools?}``."""
    row = obj(record)
    messages = _tools_message(row.get("tools"))
    system = text(row, "system", required=False)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    for k, turn in enumerate(items(row, "conversations")):
        speaker = text(turn, "from").lower() if isinstance(turn, dict) else None
        if speaker not in SHAREGPT_ROLES:
            raise BadRecord(f"conversations[{k}]: unknown speaker {speaker!r}; expected one of "
                            f"{', '.join(SHAREGPT_ROLES)}", "from")
        messages.append({"role": SHAREGPT_ROLES[speaker], "content": text(turn, "value")})
    rid = row.get("id")
    return chat_example(messages, id=rid if isinstance(rid, str) and rid else f"{stem}-{where}", task=stem)


def load_sharegpt(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """ShareGPT/Vicuna JSON array (FastChat's layout) or the same objects as JSONL."""
    records, unit = records_of(path)
    return convert_records(records, lambda r, i: sharegpt_example(r, i, stem=path.stem), path=path, unit=unit,
                           opts=opts, report=report)


def _openai_content(message: dict[str, Any], k: int) -> str:
    content = message.get("content")
    if content is None and message.get("tool_calls"):
        return json.dumps(message["tool_calls"], ensure_ascii=False)
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise BadRecord(f"messages[{k}]: content must be text or a list of text parts", "content")


def openai_example(record: Any, where: int, *, stem: str) -> Example:
    """``{messages: [{role, content}], tools?}`` (the OpenAI fine-tuning layout)."""
    row = obj(record)
    messages = _tools_message(row.get("tools"))
    for k, message in enumerate(items(row, "messages")):
        role = text(message, "role")
        if role not in OPENAI_ROLES:
            raise BadRecord(f"messages[{k}]: unknown role {role!r}; expected one of {', '.join(OPENAI_ROLES)}",
                            "role")
        messages.append({"role": OPENAI_ROLES[role], "content": _openai_content(message, k)})
    rid = row.get("id")
    return chat_example(messages, id=rid if isinstance(rid, str) and rid else f"{stem}-{where}", task=stem)


def load_openai(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """OpenAI chat fine-tuning JSONL."""
    records, unit = records_of(path)
    return convert_records(records, lambda r, i: openai_example(r, i, stem=path.stem), path=path, unit=unit,
                           opts=opts, report=report)


def _question_id(row: dict[str, Any]) -> int | str:
    qid = row.get("question_id")
    if not isinstance(qid, int | str) or isinstance(qid, bool):
        raise BadRecord("expected an integer id", "question_id")
    return qid


def mt_bench_example(record: Any, where: int, answers: dict[Any, list[str]]) -> Example:
    """``{question_id, category, turns, reference?}``; reference answers make it a full conversation."""
    row = obj(record)
    qid, turns = _question_id(row), strings(row, "turns")
    if not turns:
        raise BadRecord("expected at least one turn", "turns")
    reference = answers.get(qid) or strings(row, "reference", required=False)
    meta = {"question_id": qid, "category": text(row, "category", required=False), "turns": turns}
    messages = _answered(turns, reference)
    if messages:
        return chat_example(messages, id=f"mt_bench-{qid}", task="mt_bench", meta=meta)
    return Example(id=f"mt_bench-{qid}", task="mt_bench", instruction=turns[0], meta={**meta, "no_reference": True})


def _answered(turns: list[str], answers: list[str]) -> list[dict[str, str]]:
    """User/assistant pairs up to the last turn that has a non-empty answer (some references are blank)."""
    messages: list[dict[str, str]] = []
    for turn, answer in zip(turns, answers, strict=False):
        if not answer.strip():
            break
        messages += [{"role": "user", "content": turn}, {"role": "assistant", "content": answer}]
    return messages


def _answers(path: Path) -> dict[Any, list[str]]:
    out = {}
    for _, row in jsonl_records(path):
        if isinstance(row, dict) and isinstance(row.get("choices"), list) and row["choices"] \
                and isinstance(row["choices"][0], dict) and isinstance(row["choices"][0].get("turns"), list):
            out[row.get("question_id")] = [t for t in row["choices"][0]["turns"] if isinstance(t, str)]
    return out


def load_mt_bench(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """MT-Bench ``question.jsonl``; GPT-4 reference answers beside it are joined in when present."""
    answer_file = next((p for p in (path.with_name("reference_answer_gpt-4.jsonl"),
                                    path.parent / "reference_answer" / "gpt-4.jsonl") if p.is_file()), None)
    answers = _answers(answer_file) if answer_file else {}
    return convert_records(jsonl_records(path, strict=False), lambda r, i: mt_bench_example(r, i, answers), path=path,
                           unit="line", opts=opts, report=report)


def mt_bench_answer_example(record: Any, where: int, questions: dict[Any, list[str]]) -> Example:
    """``{question_id, model_id, choices: [{turns}]}``: joined with its question when question.jsonl is beside it."""
    row = obj(record)
    qid, choices = _question_id(row), items(row, "choices")
    if not choices:
        raise BadRecord("expected at least one choice", "choices")
    answers = strings(choices[0], "turns")
    if not answers:
        raise BadRecord("expected at least one answer turn", "turns")
    turns = questions.get(qid, [])
    meta = {"question_id": qid, "model_id": text(row, "model_id", required=False)}
    messages = _answered(turns, answers)
    if messages:
        return chat_example(messages, id=f"mt_bench-{qid}", task="mt_bench", meta=meta)
    return Example(id=f"mt_bench-{qid}", task="mt_bench", instruction="", output=answers[0],
                   references=tuple(answers[:1]), meta={**meta, "turns": answers})


def load_mt_bench_answers(path: Path, opts: LoadOptions, report: LoadReport) -> list[Example]:
    """MT-Bench reference answers (e.g. ``reference_answer/gpt-4.jsonl``)."""
    question_file = next((p for p in (path.with_name("question.jsonl"), path.parent.parent / "question.jsonl")
                          if p.is_file()), None)
    questions = {}
    if question_file:
        for _, row in jsonl_records(question_file):
            if isinstance(row, dict) and isinstance(row.get("turns"), list):
                questions[row.get("question_id")] = [t for t in row["turns"] if isinstance(t, str)]
    return convert_records(jsonl_records(path, strict=False), lambda r, i: mt_bench_answer_example(r, i, questions), path=path,
                           unit="line", opts=opts, report=report)
