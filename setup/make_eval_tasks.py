"""Write the data files of the offline lm-eval tasks in configs/tasks/ from the synthetic stories.

    python setup/make_eval_tasks.py [--out configs/tasks] [--n-test 100] [--n-fewshot 20]

`synthetic_mc` (HellaSwag/PIQA format: a context and 4 endings) and `synthetic_qa` (NQ-Open format:
a question and a short answer) ask the questions of test-split stories (`lingua.synthetic`);
few-shot examples come from training-split stories. The same arguments always write the same bytes.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from lingua.synthetic import Split, make_story, story_indices

TASK_DIR = Path(__file__).resolve().parents[1] / "configs" / "tasks"
CORPUS_SEED = 0  # the corpus seed the training data uses (setup/make_synthetic_data.py default)


def _context(story_body: str, earlier_lines: list[str]) -> str:
    """The story and the questions answered before this one, as the training text shows them."""
    return story_body + "\n\n" + "".join(line + "\n" for line in earlier_lines)


def multiple_choice_docs(split: Split, n_stories: int, seed: int = CORPUS_SEED) -> list[dict[str, Any]]:
    """One doc per question: ctx ends with "Q: ... A:", endings are the answer and its 3
    distractors in a seeded order, label is the answer's position."""
    docs = []
    for index in story_indices(split, n_stories):
        story = make_story(seed, index)
        for k, question in enumerate(story.questions):
            endings = [question.answer, *question.distractors]
            random.Random(f"synthetic_mc:{index}:{k}").shuffle(endings)
            earlier = [q.line for q in story.questions[:k]]
            docs.append({
                "id": f"{index}-{k}",
                "kind": question.kind,
                "ctx": _context(story.body, earlier) + question.prompt,
                "endings": endings,
                "label": endings.index(question.answer),
            })
    return docs


def question_answer_docs(split: Split, n_stories: int, seed: int = CORPUS_SEED) -> list[dict[str, Any]]:
    """One doc per question: the story (with the earlier questions answered), the question and its answer."""
    docs = []
    for index in story_indices(split, n_stories):
        story = make_story(seed, index)
        for k, question in enumerate(story.questions):
            earlier = [q.line for q in story.questions[:k]]
            docs.append({
                "id": f"{index}-{k}",
                "kind": question.kind,
                "story": _context(story.body, earlier).rstrip("\n"),
                "question": question.question,
                "answer": question.answer,
            })
    return docs


def task_files(n_test: int, n_fewshot: int) -> dict[str, list[dict[str, Any]]]:
    """File name -> docs, for every data file the task YAMLs name."""
    return {
        "synthetic_mc.test.jsonl": multiple_choice_docs("test", n_test),
        "synthetic_mc.train.jsonl": multiple_choice_docs("train", n_fewshot),
        "synthetic_qa.test.jsonl": question_answer_docs("test", n_test),
        "synthetic_qa.train.jsonl": question_answer_docs("train", n_fewshot),
    }


def render(docs: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TASK_DIR, help="folder of the task YAMLs")
    parser.add_argument("--n-test", type=int, default=100, help="test-split stories (2-4 questions each)")
    parser.add_argument("--n-fewshot", type=int, default=20, help="training-split stories for few-shot examples")
    args = parser.parse_args(argv)
    if args.n_test < 1 or args.n_fewshot < 1:
        parser.error("--n-test and --n-fewshot must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    for name, docs in task_files(args.n_test, args.n_fewshot).items():
        path = args.out / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text(render(docs), encoding="utf-8")
        tmp.replace(path)
        print(f"{path}: {len(docs)} docs")


if __name__ == "__main__":
    main()
