"""Per-document in-context test: multiple-choice accuracy against the number of shots taken from the
same document.

The offline task `synthetic_mc` (configs/tasks) asks 2 to 4 questions about each story. Here each
question is asked after the story and k other questions of the same story answered in the text's
own format ("Q: ... A: answer."), for every k in `shots`, over the same questions at every k (the
stories with at least max(shots) + 1 questions): the shots live in the document the model reads,
as in-context examples do. Choices are scored with the lm-eval adapter (lingua.evaluation.lm_eval_adapter): acc
picks the highest log-likelihood, acc_norm the highest per character (lm-eval's definitions).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from lm_eval.api.instance import Instance

from lingua.args import ConfigError, InputError
from lingua.evaluation.lm_eval_adapter import LinguaLM
from lingua.evaluation.scoring import LogitsFn
from lingua.evaluation.tasks import LOCAL_TASKS_DIR
from lingua.tokenizer import Tokenizer

STORY_END = "\n\nQ: "  # a synthetic_mc context: story, blank line, answered questions, "Q: <question> A:"


@dataclass
class InContextArgs:
    RANGES: ClassVar[dict[str, str]] = {"limit": ">= 1", "batch_size": ">= 1"}

    task_file: str = str(LOCAL_TASKS_DIR / "synthetic_mc.test.jsonl")  # docs in the synthetic_mc format (id "<story>-<k>", ctx, endings, label)
    shots: list[int] = field(default_factory=lambda: [0, 1, 2])  # answered questions of the same story before the one asked
    limit: int | None = None  # stories to use (None: every story with enough questions)
    batch_size: int = 8  # sequences per forward pass

    def __post_init__(self) -> None:
        if not self.shots or any(k < 0 for k in self.shots) or len(set(self.shots)) != len(self.shots):
            raise ConfigError(f"in_context.shots={self.shots}: give distinct counts >= 0, e.g. [0, 1, 2]")
        self.shots = sorted(self.shots)


@dataclass(frozen=True)
class StoryQuestion:
    prompt: str  # "Q: Where is the sock? A:"
    endings: tuple[str, ...]  # the choices, without the leading space
    label: int  # index of the right ending

    @property
    def line(self) -> str:
        """The question answered, as the stories' text writes it."""
        return f"{self.prompt} {self.endings[self.label]}."


def read_stories(path: str | Path) -> list[tuple[str, list[StoryQuestion]]]:
    """(story, its questions in order) for each story of a synthetic_mc file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"in_context.task_file='{path}' does not exist")
    stories: dict[str, str] = {}
    questions: dict[str, list[tuple[int, StoryQuestion]]] = defaultdict(list)
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            doc = json.loads(line)
            story_id, _, index = doc["id"].rpartition("-")
            k = int(index)
            ctx, endings, label = doc["ctx"], tuple(doc["endings"]), int(doc["label"])
            story, prompt = ctx[: ctx.index(STORY_END)], ctx[ctx.rindex("Q: ") :]
            if not story_id or not 0 <= label < len(endings) or not prompt.endswith(" A:"):
                raise ValueError("bad id, label or question")
        except (ValueError, KeyError, TypeError) as error:
            raise InputError(f"{path}:{number}: not a synthetic_mc doc (id '<story>-<k>', ctx ending in 'Q: ... A:', endings, label): {error}") from None
        if stories.setdefault(story_id, story) != story:
            raise InputError(f"{path}:{number}: story '{story_id}' differs from its earlier questions' story")
        questions[story_id].append((k, StoryQuestion(prompt, endings, label)))
    return [(stories[s], [q for _, q in sorted(questions[s], key=lambda kq: kq[0])]) for s in stories]


def build_items(stories: list[tuple[str, list[StoryQuestion]]], args: InContextArgs) -> list[tuple[int, str, StoryQuestion]]:
    """(shots, context, question) for every question of the usable stories and every shot count;
    the shots are the story's other questions, in story order."""
    usable = [s for s in stories if len(s[1]) > args.shots[-1]]
    if args.limit is not None:
        usable = usable[: args.limit]
    if not usable:
        raise InputError(f"no story has {args.shots[-1] + 1} questions: lower the largest of in_context.shots={args.shots}")
    items = []
    for story, questions in usable:
        for j, question in enumerate(questions):
            others = questions[:j] + questions[j + 1 :]
            for k in args.shots:
                answered = "".join(q.line + "\n" for q in others[:k])
                items.append((k, story + "\n\n" + answered + question.prompt, question))
    return items


def sequence_lengths(items: list[tuple[int, str, StoryQuestion]], tokenizer: Tokenizer) -> list[int]:
    """Per item, the tokens of its longest BOS + context + ending (the model must read them whole)."""
    return [max(len(tokenizer.encode(f"{context} {ending}", add_bos=True)) for ending in q.endings) for _, context, q in items]


def in_context_accuracy(
    logits_fn: LogitsFn, tokenizer: Tokenizer, items: list[tuple[int, str, StoryQuestion]], args: InContextArgs, device: Any
) -> dict[str, Any]:
    """acc and acc_norm per shot count. Every sequence is read whole (the model must take
    max(sequence_lengths(items)) tokens); nothing is cut."""
    lm = LinguaLM(tokenizer, logits_fn, max(sequence_lengths(items, tokenizer)), device, batch_size=args.batch_size)
    requests = [(context, f" {ending}") for _, context, q in items for ending in q.endings]
    scores = iter(lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)]))
    hits: dict[int, list[tuple[bool, bool]]] = defaultdict(list)
    for k, _, question in items:
        logliks = np.array([next(scores)[0] for _ in question.endings])
        per_char = logliks / np.array([len(e) for e in question.endings])
        hits[k].append((int(logliks.argmax()) == question.label, int(per_char.argmax()) == question.label))
    return {
        "questions": len(hits[args.shots[0]]),
        "stories": len({context[: context.index(STORY_END)] for _, context, _ in items}),
        "shots": [
            {"shots": k, "acc": float(np.mean([a for a, _ in hits[k]])), "acc_norm": float(np.mean([n for _, n in hits[k]]))}
            for k in args.shots
        ],
    }


def plot_in_context(curves: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """acc_norm against shots, one line per model."""
    from lingua.plot import plt, save_figure

    figure, axes = plt.subplots(figsize=(6, 4))
    for name, result in curves.items():
        axes.plot([s["shots"] for s in result["shots"]], [s["acc_norm"] for s in result["shots"]], marker="o", label=name)
    save_figure(figure, axes, path, "answered questions of the same story before the question (shots)", "accuracy (acc_norm)", title)
