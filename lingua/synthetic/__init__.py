"""The offline default corpus: short generated stories with questions that need the context.

stories.py holds the story grammar (`make_story`, the splits' story numbers), corpus.py the shard
files the data pipeline reads (`write_corpus`, `ensure_corpus`); evaluation turns the questions
into multiple-choice and short-answer tasks (setup/make_eval_tasks.py).
"""

from lingua.synthetic.corpus import SOURCE, ensure_corpus, existing_shards, shard_paths, write_corpus
from lingua.synthetic.stories import (
    ADJECTIVES, CONTAINERS, NAMES, OBJECTS, SETTINGS, SPLIT_SIZE, SPLITS, Question, QuestionKind, Split, Story, make_story, story_indices,
)

__all__ = [
    "ADJECTIVES", "CONTAINERS", "NAMES", "OBJECTS", "SETTINGS", "SOURCE", "SPLITS", "SPLIT_SIZE", "Question", "QuestionKind", "Split",
    "Story", "ensure_corpus", "existing_shards", "make_story", "shard_paths", "story_indices", "write_corpus",
]
