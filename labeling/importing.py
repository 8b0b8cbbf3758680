"""Turning outside data into records: parsers for the formats the field uses, and their checks
(labeling/services/records.py writes them as conversation trees).

A parsed record is one of three shapes, all with a context (the turns before the reply):
- a prompt: the context only;
- a demonstration: the context and a human-written assistant reply;
- a preference: the context and two assistant replies, chosen above rejected (or a K-way ranking).
Each record is identified by a content hash, so importing the same data twice adds nothing.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Q

from labeling.limits import MAX_MESSAGE_CHARS
from labeling.models import (
    ALLOWED_CHILD_ROLES,
    Role,
)
from labeling.validators import unstorable_text

IMPORT_USERNAME = "import-bot"


IMPORTED_LABELER_PREFIX = "imported-"  # + an exported labeler pseudonym: the account of their imported rankings


def imported_labeler_q(prefix: str = "") -> Q:
    """Accounts of imported data (the import account, and one per imported labeler pseudonym), as a filter on
    `<prefix>username`."""
    return Q(**{f"{prefix}username": IMPORT_USERNAME}) | Q(**{f"{prefix}username__startswith": IMPORTED_LABELER_PREFIX})


class RecordError(ValueError):
    """A record that cannot be imported; the message says why."""


@dataclass(frozen=True)
class Turn:
    role: str
    content: str


@dataclass
class ImportRecord:
    kind: str  # "prompt" | "demonstration" | "preference"
    context: list[Turn]
    reply: str | None = None
    chosen: str | None = None
    rejected: str | None = None
    dataset: str = ""
    language: str = "en"
    tags: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    completions: list[str] | None = None  # a K-way ranking: the candidates,
    ranks: list[int] | None = None  # their ranks (1 is best; equal ranks are ties),
    labeler: str = ""  # and who ranked them (a pseudonym from an export), or the import account

    @property
    def content_hash(self) -> str:
        content = {
            "kind": self.kind,
            "context": [[t.role, t.content] for t in self.context],
            "reply": self.reply,
            "chosen": self.chosen,
            "rejected": self.rejected,
        }
        if self.kind == "ranking":  # (the other kinds keep the hashes earlier imports stored)
            content.update(completions=self.completions, ranks=self.ranks, labeler=self.labeler)
        canonical = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


_HH_SPEAKER = re.compile(r"\n\n(Human|Assistant):[ ]?")


def parse_hh_transcript(transcript: str) -> list[Turn]:
    """Split an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") into turns.

    Consecutive turns of the same speaker are joined, so the result alternates as a chat template expects.
    """
    if not isinstance(transcript, str):
        raise RecordError("the transcript must be a string")
    parts = _HH_SPEAKER.split(transcript)
    if parts[0].strip():
        raise RecordError("the transcript must start with '\\n\\nHuman:'")
    turns: list[Turn] = []
    for speaker, text in zip(parts[1::2], parts[2::2], strict=True):
        role = Role.USER if speaker == "Human" else Role.ASSISTANT
        text = text.strip()
        if turns and turns[-1].role == role:
            turns[-1] = Turn(role, f"{turns[-1].content}\n\n{text}".strip())
        else:
            turns.append(Turn(role, text))
    if not turns:
        raise RecordError("the transcript has no 'Human:' or 'Assistant:' turns")
    return turns


def hh_pair_record(row: dict, *, dataset: str = "hh-rlhf") -> ImportRecord:
    """An HH-RLHF {"chosen", "rejected"} pair: the shared turns are the context, the last assistant turns differ."""
    if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
        raise RecordError('expected an object with "chosen" and "rejected" transcripts')
    chosen, rejected = parse_hh_transcript(row["chosen"]), parse_hh_transcript(row["rejected"])
    if chosen[-1].role != Role.ASSISTANT or rejected[-1].role != Role.ASSISTANT:
        raise RecordError("both transcripts must end with an Assistant turn")
    if chosen[:-1] != rejected[:-1]:
        raise RecordError("the chosen and rejected transcripts differ before their last Assistant turn")
    context = chosen[:-1]
    if not context or context[-1].role != Role.USER:
        raise RecordError("the context must end with a Human turn")
    return _preference(context, chosen[-1].content, rejected[-1].content, dataset=dataset)


def _preference(context, chosen, rejected, *, dataset) -> ImportRecord:
    if chosen.strip() == rejected.strip():
        raise RecordError("the chosen and rejected replies are identical")
    return ImportRecord(kind="preference", context=context, chosen=chosen, rejected=rejected, dataset=dataset)


def self_instruct_record(row: dict, *, dataset: str) -> ImportRecord:
    """A Self-Instruct task: the instruction (and its input) is the prompt, the expert output the demonstration."""
    try:
        instruction = row["instruction"].strip()
        instance = row["instances"][0]
        task_input, output = instance.get("input", "").strip(), instance["output"].strip()
    except (KeyError, IndexError, TypeError, AttributeError):
        raise RecordError('expected "instruction" and "instances": [{"input", "output"}]') from None
    if not instruction or not output:
        raise RecordError("the instruction and the output must not be empty")
    prompt = f"{instruction}\n\n{task_input}" if task_input else instruction
    tags = [t for t in [row.get("motivation_app", ""), row.get("name", "")] if t]
    return ImportRecord(
        kind="demonstration",
        context=[Turn(Role.USER, prompt)],
        reply=output,
        dataset=dataset,
        tags=[_tag(t) for t in tags],
        metadata={"source_id": row.get("id", "")},
    )


def _turns(value, field: str) -> list[Turn]:
    """A list of {"role", "content"} messages, checked."""
    if not isinstance(value, list) or not value:
        raise RecordError(f'"{field}" must be a non-empty list of {{"role", "content"}} messages')
    turns = []
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise RecordError(f'"{field}"[{index}] must be an object with a string "content"')
        role = message.get("role")
        if role not in Role.values:
            raise RecordError(f'"{field}"[{index}] has role {role!r}; expected system, user or assistant')
        turns.append(Turn(role, message["content"]))
    return turns


def prompt_record(row: dict, *, dataset: str = "") -> ImportRecord:
    """{"prompt": "..."} or {"messages": [... ending with a user turn]}."""
    if isinstance(row.get("prompt"), str):
        context = [Turn(Role.USER, row["prompt"])]
    elif "messages" in row:
        context = _turns(row["messages"], "messages")
    else:
        raise RecordError('a prompt needs "prompt" (a string) or "messages" (a list ending with a user turn)')
    if context[-1].role != Role.USER:
        raise RecordError("a prompt's messages must end with a user turn")
    return ImportRecord(kind="prompt", context=context, dataset=dataset, **_extras(row))


def demonstration_record(row: dict, *, dataset: str = "") -> ImportRecord:
    """{"messages": [..., user, assistant]}: the last assistant turn is the demonstration."""
    turns = _turns(row.get("messages"), "messages")
    if turns[-1].role != Role.ASSISTANT or len(turns) < 2:
        raise RecordError("a demonstration's messages must end with an assistant turn after a user turn")
    return ImportRecord(
        kind="demonstration", context=turns[:-1], reply=turns[-1].content, dataset=dataset, **_extras(row)
    )


def trl_preference_record(row: dict, *, dataset: str = "") -> ImportRecord:
    """TRL's preference form: {"prompt": [...], "chosen": [...], "rejected": [...]} (explicit prompt), or
    chosen/rejected holding whole conversations that share all but their last assistant turn (implicit)."""
    chosen, rejected = _turns(row.get("chosen"), "chosen"), _turns(row.get("rejected"), "rejected")
    if "prompt" in row:
        prompt = row["prompt"]
        context = [Turn(Role.USER, prompt)] if isinstance(prompt, str) else _turns(prompt, "prompt")
    else:
        if chosen[:-1] != rejected[:-1]:
            raise RecordError("without a prompt, chosen and rejected must share all but their last turn")
        context, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    for name, turns in (("chosen", chosen), ("rejected", rejected)):
        if len(turns) != 1 or turns[0].role != Role.ASSISTANT:
            raise RecordError(f'"{name}" must be one assistant message')
    if not context or context[-1].role != Role.USER:
        raise RecordError("the prompt must end with a user turn")
    record = _preference(context, chosen[0].content, rejected[0].content, dataset=dataset)
    for name, value in _extras(row).items():
        setattr(record, name, value)
    return record


_PSEUDONYM = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")


def ranking_record(row: dict, *, dataset: str = "") -> ImportRecord:
    """A K-way ranking as rankings.jsonl exports it: {"prompt": [...messages] or "text", "completions": [...],
    "ranks": [...], "labeler"?}; rank 1 is best and equal ranks are ties."""
    prompt = row.get("prompt")
    context = [Turn(Role.USER, prompt)] if isinstance(prompt, str) else _turns(prompt, "prompt")
    completions, ranks = row.get("completions"), row.get("ranks")
    if not isinstance(completions, list) or not all(isinstance(c, str) for c in completions):
        raise RecordError('"completions" must be a list of strings')
    if not isinstance(ranks, list) or not all(type(r) is int for r in ranks):
        raise RecordError('"ranks" must be a list of whole numbers')
    labeler = row.get("labeler") or ""
    if not isinstance(labeler, str) or (labeler and not _PSEUDONYM.fullmatch(labeler)):
        raise RecordError('"labeler" must be a pseudonym of letters, digits, "-", "_" or "." (at most 48)')
    record = ImportRecord(
        kind="ranking", context=context, completions=completions, ranks=ranks, labeler=labeler, dataset=dataset
    )
    for name, value in _extras(row).items():
        setattr(record, name, value)
    return record


def _extras(row: dict) -> dict:
    extras = {}
    if isinstance(row.get("language"), str) and 2 <= len(row["language"]) <= 16:
        extras["language"] = row["language"]
    if isinstance(row.get("tags"), list):
        extras["tags"] = [_tag(str(t)) for t in row["tags"] if str(t).strip()][:10]
    return extras


FORMATS = {
    "prompts": prompt_record,
    "demonstrations": demonstration_record,
    "hh": hh_pair_record,
    "trl_preference": trl_preference_record,
    "rankings": ranking_record,
}


def detect_format(row: dict) -> str:
    """Which of FORMATS a row is in, from its keys."""
    if "completions" in row and "ranks" in row:
        return "rankings"
    if "chosen" in row and "rejected" in row:
        return "hh" if isinstance(row["chosen"], str) and "prompt" not in row else "trl_preference"
    if "messages" in row:
        messages = row["messages"]
        last = messages[-1] if isinstance(messages, list) and messages else None
        return "demonstrations" if isinstance(last, dict) and last.get("role") == Role.ASSISTANT else "prompts"
    if "prompt" in row:
        return "prompts"
    raise RecordError('unknown row: expected "prompt", "messages", or "chosen" and "rejected"')


def parse_row(row, *, format: str = "auto", dataset: str = "") -> ImportRecord:
    if not isinstance(row, dict):
        raise RecordError("each line must be a JSON object")
    name = detect_format(row) if format == "auto" else format
    if name not in FORMATS:
        raise RecordError(f"unknown format {format!r}; use auto, {', '.join(FORMATS)}")
    record = FORMATS[name](row, dataset=dataset)
    validate_record(record)
    return record


def _strings(value):
    """Every string in a parsed JSON value, keys included (no recursion: json.loads bounds the depth already)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


class LongLine(bytes):
    """The first bytes of a line longer than the limit (bounded_lines), with its whole length."""

    length: int


def bounded_lines(blocks, limit: int):
    """The byte lines (each with its newline) of a stream given as blocks of bytes, holding at most `limit` + 1
    bytes of any line: a longer one is a LongLine of its first bytes, so that a one-line 2 GB upload is never
    held in memory whole."""
    kept, length = bytearray(), 0
    for block in blocks:
        start = 0
        while start < len(block):
            newline = block.find(b"\n", start)
            end = len(block) if newline < 0 else newline + 1
            piece = memoryview(block)[start:end]
            length += len(piece)
            if len(kept) <= limit:
                kept += piece[: limit + 1 - len(kept)]
            start = end
            if newline >= 0:
                yield _line(kept, length, limit)
                kept, length = bytearray(), 0
    if length:
        yield _line(kept, length, limit)


def _line(kept: bytearray, length: int, limit: int) -> bytes:
    if length <= limit:
        return bytes(kept)
    line = LongLine(kept)
    line.length = length
    return line


def parse_jsonl(lines, *, format: str = "auto", dataset: str = ""):
    """Yield (line number, ImportRecord or RecordError) for each non-blank line of a JSONL byte stream."""
    limit = settings.IMPORT_MAX_LINE_BYTES
    for number, raw in enumerate(lines, start=1):
        if len(raw) > limit:
            length = getattr(raw, "length", len(raw))
            yield number, RecordError(f"the line is {length:,} bytes long; the limit is {limit:,}")
            continue
        try:
            text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError as exc:
            yield number, RecordError(f"not valid UTF-8 (byte {exc.start})")
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            yield number, RecordError(f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        except RecursionError:
            yield number, RecordError("not valid JSON here: nested too deeply")
            continue
        problem = next(filter(None, map(unstorable_text, _strings(row))), "")  # any field, keys included
        if problem:
            yield number, RecordError(f"the line {problem}")
            continue
        try:
            yield number, parse_row(row, format=format, dataset=dataset)
        except RecordError as exc:
            yield number, exc


def validate_record(record: ImportRecord) -> None:
    """Check a parsed record before anything is written: the turns alternate as a conversation tree needs."""
    if record.kind not in {"prompt", "demonstration", "preference", "ranking"}:
        raise RecordError(f"unknown record kind {record.kind!r}")
    if not record.context:
        raise RecordError("the conversation has no turns")
    parent_role = None
    for turn in record.context:
        if turn.role not in ALLOWED_CHILD_ROLES[parent_role]:
            expected = " or ".join(sorted(ALLOWED_CHILD_ROLES[parent_role]))
            raise RecordError(f"a {turn.role} turn cannot follow {parent_role or 'the start'}; expected {expected}")
        if not turn.content.strip():
            raise RecordError(f"a {turn.role} turn is empty")
        if len(turn.content) > MAX_MESSAGE_CHARS:
            raise RecordError(f"a turn is {len(turn.content)} characters long; the limit is {MAX_MESSAGE_CHARS}")
        parent_role = turn.role
    if record.kind in {"demonstration", "preference", "ranking"} and parent_role != Role.USER:
        raise RecordError("the conversation must end with a user turn before the reply")
    if record.kind == "ranking":
        _validate_ranking(record)
        return
    replies = [record.reply] if record.kind == "demonstration" else [record.chosen, record.rejected]
    if record.kind == "prompt":
        replies = []
    for reply in replies:
        if not isinstance(reply, str):
            raise RecordError("a reply must be a string")
        if len(reply) > MAX_MESSAGE_CHARS:
            raise RecordError(f"a reply is {len(reply)} characters long; the limit is {MAX_MESSAGE_CHARS}")
    if record.kind == "demonstration" and not record.reply.strip():
        raise RecordError("the demonstration reply is empty")


def _validate_ranking(record: ImportRecord) -> None:
    completions, ranks = record.completions or [], record.ranks or []
    if not 2 <= len(completions) <= 9:
        raise RecordError(f"a ranking has 2 to 9 completions, not {len(completions)}")
    if len(ranks) != len(completions):
        raise RecordError(f"{len(completions)} completions but {len(ranks)} ranks")
    if not all(1 <= rank <= len(completions) for rank in ranks):
        raise RecordError(f"ranks go from 1 (best) to {len(completions)}")
    for text in completions:
        if not text.strip():
            raise RecordError("a completion is empty")
        if len(text) > MAX_MESSAGE_CHARS:
            raise RecordError(f"a completion is {len(text)} characters long; the limit is {MAX_MESSAGE_CHARS}")
    if len({text.strip() for text in completions}) < len(completions):
        raise RecordError("two completions are the same text")


def _tag(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]
