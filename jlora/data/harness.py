"""GSM8K scored as lm-evaluation-harness's `gsm8k` task does (version 3), so a jlora number can
stand next to the Open LLM Leaderboard's and the papers' harness runs.

The task (`lm_eval/tasks/gsm8k/gsm8k.yaml` of EleutherAI/lm-evaluation-harness):
- prompt `"Question: {question}\\nAnswer:"`; with n shots, n solved train problems before it as
  `"Question: {q}\\nAnswer: {a}"` joined by `"\\n\\n"` (`fewshot_prompt`; the harness draws them
  at random with seed 1234, jlora takes the first n of the rows given, so state which);
- greedy decoding until `"Question:"`, `"</s>"` or `"<|im_end|>"` (`truncate`);
- two filters on the generation: **strict-match**, the first `#### <number>`
  (regex `#### (\\-?[0-9\\.\\,]+)`), and **flexible-extract**, the last number-like run in the
  text (regex `(-?[$0-9.,]{2,})|(-?[0-9]+)`); no match gives `"[invalid]"`;
- `exact_match` on strings after removing `,`, `$`, everything up to the last `"#### "` and a
  final `.` from both the extracted answer and the whole reference answer, ignoring case.

It compares strings, not values: `18.00` does not match `18` and `$12.50.` gives `12.50`, not
`12.5` (jlora's own `jlora.data.exact_match` compares values; both are reported).

Example:
  >>> ref = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\\n#### 72"
  >>> score("She sold 72 clips.\\n#### 72\\n\\nQuestion: next", ref)
  {'strict-match': True, 'flexible-extract': True}
  >>> score("In all 1,000 + 72 = 1,072 clips.", "#### 1072")
  {'strict-match': False, 'flexible-extract': True}
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

# `generation_kwargs.until` of the task: the generation ends before the first of these.
UNTIL = ("Question:", "</s>", "<|im_end|>")
# The two filters' regexes and which findall match each takes (0: first, -1: last).
FILTERS = {
    "strict-match": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible-extract": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
# What a filter returns when its regex finds nothing.
FALLBACK = "[invalid]"
# `metric_list[0].regexes_to_ignore`, removed in this order from prediction and reference.
IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")
PROMPT = "Question: {question}\nAnswer:"


def truncate(text: str, until: Sequence[str] = UNTIL) -> str:
    """`text` up to the first occurrence of any stop string (the harness's `until`).

    Example:
      >>> truncate("#### 5\\n\\nQuestion: what</s>")
      '#### 5\\n\\n'
    """
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


def extract(text: str, name: str) -> str:
    """The answer filter `name` ("strict-match" or "flexible-extract") takes from `text`.

    Example:
      >>> extract("5 - 3 = 2, so -2 is wrong", "flexible-extract")
      '-2'
      >>> extract("5 - 3 = 2", "strict-match")
      '[invalid]'
    """
    if name not in FILTERS:
        raise ValueError(f"filter {name!r}: expected one of {sorted(FILTERS)}")
    regex, which = FILTERS[name]
    found = regex.findall(text)
    if not found:
        return FALLBACK
    match = found[which]
    if isinstance(match, tuple):  # several groups: the first non-empty one
        match = next(m for m in match if m)
    return match.strip()


def clean(text: str) -> str:
    """`text` as the task's `exact_match` compares it (`IGNORE` removed, lower case).

    Example:
      >>> clean("Her total: $1,234.\\n#### 1,234."), clean("$12.50.")
      ('1234', '12.50')
    """
    for pattern in IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def score(generation: str, reference: str) -> dict[str, bool]:
    """`{filter: exact match}` of one raw generation (truncated here) against the reference
    answer (GSM8K's whole worked solution ending in `#### <number>`)."""
    text = truncate(generation)
    want = clean(reference)
    return {name: clean(extract(text, name)) == want for name in FILTERS}


def accuracy(generations: Iterable[str], references: Iterable[str]) -> dict[str, float]:
    """The mean of `score` over a data set, keyed by filter.

    Example:
      >>> accuracy(["#### 3", "it is 4"], ["#### 3", "#### 5"])
      {'strict-match': 0.5, 'flexible-extract': 0.5}
    """
    totals = dict.fromkeys(FILTERS, 0)
    n = 0
    for generation, reference in zip(generations, references, strict=True):
        for name, hit in score(generation, reference).items():
            totals[name] += hit
        n += 1
    return {name: total / max(n, 1) for name, total in totals.items()}


def fewshot_prompt(question: str, shots: Sequence[Mapping[str, str]] = ()) -> str:
    """The task's prompt for `question`, after `shots` (rows with "question" and "answer").

    Example:
      >>> fewshot_prompt("2 + 2?", [{"question": "1 + 1?", "answer": "#### 2"}])
      'Question: 1 + 1?\\nAnswer: #### 2\\n\\nQuestion: 2 + 2?\\nAnswer:'
    """
    parts = [f"{PROMPT.format(question=s['question'])} {s['answer']}" for s in shots]
    return "\n\n".join([*parts, PROMPT.format(question=question)])
