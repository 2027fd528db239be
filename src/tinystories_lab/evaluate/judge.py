"""The TinyStories paper's grading by any OpenAI-compatible chat endpoint, with strict parsing and a cache.

One story costs two chat calls (the paper's assessment, then the grades), plus one more when the grades come
back in another format; a second miss is recorded as unparseable, never as a score. Every graded story is
appended to a JSONL cache as soon as it is graded, keyed by (run, beginning, completion, judge model).
The API key comes from the environment variable `JUDGE_API_KEY` and is never written anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tinystories_lab.errors import UserError

API_KEY_VARIABLE = "JUDGE_API_KEY"
CRITERIA = ("grammar", "creativity", "consistency", "plot")
AGE_GROUPS = {"A": "3 or under", "B": "4-5", "C": "6-7", "D": "8-9", "E": "10-12", "F": "13-16"}

# The paper's prompt (Eldan and Li, 2023, section 3.1): the assessment first, then the grades and age group;
# the format lines are ours, so that grades can be parsed strictly.
ASSESS = {
    "beginning": (
        "In the following exercise, the student is given a beginning of a story. The student needs to "
        "complete it into a full story. The exercise tests the student's language abilities and creativity. "
        "The symbol *** marks the separator between the prescribed beginning and the student's "
        "completion:\n\n"
        "{beginning}***{completion}\n\n"
        "Please provide your general assessment about the part written by the student (the one after the *** "
        "symbol). Is it gramatically correct? Is it consistent with the beginning of the story? Pay special "
        "attention to whether the student manages to complete the sentence which is split in the middle by "
        "the separator ***."
    ),
    "instruction": (
        "In the following exercise, the student is given an instruction to write a story. The exercise tests "
        "the student's language abilities, creativity and ability to follow the instruction. The symbol *** "
        "marks the separator between the instruction and the student's story:\n\n"
        "{beginning}\n***\n{completion}\n\n"
        "Please provide your general assessment about the story written by the student (the part after the "
        "*** symbol). Is it gramatically correct? Is it consistent with the instruction?"
    ),
}
FORMAT = (
    "Answer with exactly these five lines and nothing else, each grade a whole number from 1 to 10:\n"
    "Grammar: N/10\nCreativity: N/10\nConsistency: N/10\nPlot: N/10\nAge group: X"
)
GRADE = (
    "Now, grade the student's completion in terms of grammar, creativity, consistency with the story's "
    "beginning and whether the plot makes sense. Moreover, please provide your best guess of what the age "
    "of the student might be, as reflected from the completion. Choose from possible age groups: "
    + " ".join(f"{k}: {v}." for k, v in AGE_GROUPS.items())
    + "\n\n"
    + FORMAT
)
AGAIN = "Your answer was not in the required format. " + FORMAT
LINE = re.compile(r"^\s*(grammar|creativity|consistency|plot)\s*:\s*(\d+)\s*/\s*10\s*$", re.I | re.M)
AGE = re.compile(r"^\s*age group\s*:\s*([A-F])\s*\.?\s*$", re.I | re.M)


class JudgeError(UserError):
    """The judge endpoint failed (down, slow, or not speaking the chat-completions protocol)."""


def parse_grades(answer: str) -> dict | None:
    """The four grades and the age group of an answer in the required format, or None: every criterion
    exactly once as 'Name: N/10' with N in 1..10 on a line of its own, and one 'Age group: X' line."""
    found = LINE.findall(answer)
    ages = AGE.findall(answer)
    names = [name.lower() for name, _ in found]
    if sorted(names) != sorted(CRITERIA) or len(ages) != 1:
        return None
    grades = {name.lower(): int(value) for name, value in found}
    if not all(1 <= v <= 10 for v in grades.values()):
        return None
    return grades | {"age_group": ages[0].upper()}


def cache_key(run: str, beginning: str, completion: str, judge_model: str) -> str:
    return hashlib.sha256(json.dumps([run, beginning, completion, judge_model]).encode()).hexdigest()


@dataclass
class Judge:
    """A chat-completions client: `url` is the API's base (e.g. http://127.0.0.1:8000/v1) or its full
    /chat/completions address; `model` the judge model's name as the endpoint knows it."""

    url: str
    model: str
    timeout: float = 120.0
    max_tokens: int = 512

    @property
    def endpoint(self) -> str:
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def chat(self, messages: list[dict]) -> str:
        """One chat call (temperature 0); the reply's text. Any failure is a one-line JudgeError."""
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": 0, "max_tokens": self.max_tokens}
        ).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(API_KEY_VARIABLE)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        where = f"The judge at {self.endpoint}"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:200].decode(errors="replace").replace("\n", " ")
            hints = {401: f" (set {API_KEY_VARIABLE})", 403: f" (set {API_KEY_VARIABLE})",
                     404: " (give the API's base, e.g. http://host:8000/v1)"}  # fmt: skip
            hint = hints.get(e.code, "")
            raise JudgeError(f"{where} answered HTTP {e.code}{hint}: {detail}") from None
        except TimeoutError:
            raise JudgeError(f"{where} did not answer within {self.timeout:g} s (JUDGE_TIMEOUT=).") from None
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise JudgeError(
                    f"{where} did not answer within {self.timeout:g} s (JUDGE_TIMEOUT=)."
                ) from None
            raise JudgeError(f"{where} cannot be reached ({reason}); is it running?") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            shown = raw[:80].decode(errors="replace").replace("\n", " ")
            raise JudgeError(
                f"{where} does not answer as an OpenAI-compatible chat endpoint (got {shown!r}); "
                "check JUDGE_URL."
            ) from None
        if not isinstance(content, str):
            raise JudgeError(f"{where} answered without a message text; check JUDGE_URL and JUDGE_MODEL.")
        return content

    def grade(self, beginning: str, completion: str, kind: str = "beginning") -> dict:
        """The paper's grading of one completion: {'status': 'graded', grades..., 'answers': [...]}, or
        {'status': 'unparseable', 'answers': [...]} when the grades came back in another format twice.
        `kind`: 'beginning' (a story's start and its completion) or 'instruction' (a fine-tune's task)."""
        messages = [
            {"role": "user", "content": ASSESS[kind].format(beginning=beginning, completion=completion)}
        ]
        assessment = self.chat(messages)
        messages += [{"role": "assistant", "content": assessment}, {"role": "user", "content": GRADE}]
        answers = [assessment]
        for _ in range(2):  # the grades, then once more if in another format
            answer = self.chat(messages)
            answers.append(answer)
            grades = parse_grades(answer)
            if grades is not None:
                return {"status": "graded", **grades, "answers": answers}
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": AGAIN}]
        return {"status": "unparseable", "answers": answers}


class GradeCache:
    """Graded stories in a JSONL file, one line each, appended (and flushed to disk) as each is graded; a
    line cut short by a crash is ignored."""

    def __init__(self, path: Path):
        self.path = path
        self.entries: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[entry["key"]] = entry["result"]
                except (ValueError, KeyError, TypeError):
                    continue

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, result: dict, **about) -> None:
        self.entries[key] = result
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():  # after a line a crash cut short, start a new one
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            f.write(json.dumps({"key": key, **about, "result": result}) + "\n")
            f.flush()
            os.fsync(f.fileno())
