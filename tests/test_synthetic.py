"""The offline story corpus: determinism, answers checked by an independent re-reading of the
text, distractors, the shard layout, and ensure_corpus never rewriting or half-writing shards."""

import hashlib
import json
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import lingua.synthetic.corpus as corpus
from lingua.synthetic import CONTAINERS, NAMES, OBJECTS, SETTINGS, ensure_corpus, make_story, write_corpus

ROOT = Path(__file__).resolve().parents[1]


def _words(items):
    """A regex alternation that matches whole entries, longest first ("great hall" before "hall")."""
    return "|".join(re.escape(w) for w in sorted(set(items), key=len, reverse=True))


PLACES = {p for _, _, places in SETTINGS for p in places}
NAME_RE = re.compile(rf"\b({_words(NAMES)})\b")
OBJECT_RE = re.compile(rf"\b({_words(OBJECTS)})\b")
SPOT_RE = re.compile(rf"\bthe ({_words(PLACES | set(CONTAINERS))})\b")
BARE_SPOT_RE = re.compile(rf"\b({_words(PLACES | set(CONTAINERS))})\b")


class Reading:
    """What a reader who only knows the English of the templates learns from a story's text."""

    def __init__(self, body: str):
        self.place = {}  # person -> place
        self.holder = {}  # object -> person, or None when it lies somewhere
        self.spot = {}  # object -> container or place
        self.first = {}  # object -> its first state ("in the x" or a name)
        self.container_place = {}
        self.gives = []  # (giver, receiver, object)
        self.pickups = []  # (taker, object, "in the ..." before)
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z'])", body):
            self._read(sentence)

    def where(self, o):
        return self.holder[o] if self.holder.get(o) else f"in the {self.spot[o]}"

    def _read(self, s):
        names = NAME_RE.findall(s)
        objects = OBJECT_RE.findall(s)
        spots = SPOT_RE.findall(s)
        if objects:
            assert len(set(objects)) == 1, s
            o = objects[0]
            if m := re.search(r"\b(?:gave|handed|passed) the .+? to (\w+)", s):
                self.gives.append((names[0], m.group(1), o))
                self.holder[o] = m.group(1)
            elif re.search(r"put it in the|from the .+ to the", s):
                self.holder[o], self.spot[o] = None, spots[-1]
            elif re.search(r"\b(picked|grabbed|took)\b", s):
                self.pickups.append((names[0], o, self.where(o)))
                self.holder[o] = names[0]
            elif re.search(r"\b(had|was holding)\b", s) and names:
                self.holder[o] = names[0]
            elif spots:
                self.holder[o], self.spot[o] = None, spots[-1]
            if o in self.holder:
                self.first.setdefault(o, self.where(o))
        elif names and spots:
            for name in names:  # someone went somewhere, or is said to be there
                self.place[name] = spots[-1]
        elif not names:
            found = BARE_SPOT_RE.findall(s)
            containers = [w for w in found if w in CONTAINERS]
            places = [w for w in found if w in PLACES and w not in CONTAINERS]
            if len(containers) == 1 and len(places) == 1:
                self.container_place[containers[0]] = places[0]


def _stories(seed, n):
    return [make_story(seed, i) for i in range(n)]


def test_same_seed_same_story_different_seed_different_story():
    a, b = _stories(7, 30), _stories(7, 30)
    assert [s.text for s in a] == [s.text for s in b]
    assert a == b  # questions and distractors too
    other = _stories(8, 30)
    assert all(x.text != y.text for x, y in zip(a, other))
    assert len({s.text for s in a}) == 30


def test_stories_do_not_depend_on_the_process():
    """The same (seed, index) gives the same bytes in a fresh interpreter with another hash seed."""
    here = hashlib.sha256("".join(make_story(3, i).text for i in range(20)).encode()).hexdigest()
    code = (
        "import hashlib; from lingua.synthetic import make_story; "
        "print(hashlib.sha256(''.join(make_story(3, i).text for i in range(20)).encode()).hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
        env={"PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip() == here


def test_text_is_body_then_question_lines():
    story = make_story(0, 5)
    body, _, tail = story.text.partition("\n\n" + story.questions[0].prompt)
    assert body == story.body
    lines = story.text.split("\n")[-len(story.questions):]
    for line, q in zip(lines, story.questions):
        assert re.fullmatch(r"Q: [A-Z][^?]*\? A: [^.]+\.", line), line
        assert line == f"Q: {q.question} A: {q.answer}."
    assert "Q:" not in story.body


def test_answers_are_the_latest_state_read_back_from_the_text():
    kinds = Counter()
    changed = 0
    stateful = 0
    for seed in (0, 1):
        for story in _stories(seed, 250):
            r = Reading(story.body)
            for q in story.questions:
                kinds[q.kind] += 1
                if q.kind == "where_object":
                    o = re.fullmatch(r"Where is the (.+)\?", q.question).group(1)
                    assert r.holder[o] is None and q.answer == f"in the {r.spot[o]}", (story.text, q)
                elif q.kind == "who_has":
                    o = re.fullmatch(r"Who has the (.+)\?", q.question).group(1)
                    assert q.answer == r.holder[o], (story.text, q)
                elif q.kind == "where_person":
                    x = re.fullmatch(r"Where is (\w+)\?", q.question).group(1)
                    assert q.answer == f"in the {r.place[x]}", (story.text, q)
                elif q.kind == "what_given":
                    x, y = re.fullmatch(r"What did (\w+) give to (\w+)\?", q.question).groups()
                    assert [f"the {o}" for g, t, o in r.gives if (g, t) == (x, y)] == [q.answer], (story.text, q)
                else:
                    o, x = re.fullmatch(r"Where was the (.+) before (\w+) took it\?", q.question).groups()
                    assert [b for t, oo, b in r.pickups if (t, oo) == (x, o)] == [q.answer], (story.text, q)
                if q.kind in ("where_object", "who_has"):
                    stateful += 1
                    changed += r.first[o] != q.answer
                # The answer's entity is named in the story before the questions.
                entity = q.answer.removeprefix("in the ").removeprefix("the ")
                assert re.search(rf"\b{re.escape(entity)}\b", story.body), (story.text, q)
    assert set(kinds) == {"where_object", "who_has", "where_person", "what_given", "where_before"}, kinds
    # Many answers differ from what the story first said: the model has to follow the events.
    assert changed > 0.3 * stateful, (changed, stateful)


def test_distractors_are_wrong_answers_from_the_same_story():
    for story in _stories(2, 200):
        r = Reading(story.body)
        for q in story.questions:
            assert len(q.distractors) == 3 and len(set(q.distractors)) == 3
            assert q.answer not in q.distractors
            for wrong in q.distractors:
                entity = wrong.removeprefix("in the ").removeprefix("the ")
                assert re.search(rf"\b{re.escape(entity)}\b", story.body), (story.text, wrong)
                # The same form as the answer, so that only the content tells them apart.
                assert wrong.startswith("in the ") == q.answer.startswith("in the ")
                assert wrong.startswith("the ") == q.answer.startswith("the ")
                if q.answer.startswith("in the ") and q.kind != "where_person":
                    # "in the kitchen" is not wrong for an apple in a basket that stands in the kitchen.
                    answer = q.answer.removeprefix("in the ")
                    assert entity != r.container_place.get(answer), (story.text, q)


def test_length_and_variety():
    stories = _stories(0, 500)
    words = [len(s.text.split()) for s in stories]
    assert 60 <= min(words) and max(words) <= 360 and 150 <= sum(words) / len(words) <= 250, (min(words), max(words))
    names = Counter(n for s in stories for n in set(NAME_RE.findall(s.body)))
    assert len(names) > 120
    openings = {s.body.split(".")[0].split(",")[0].split()[0] for s in stories}
    assert len(openings) > 20  # first words differ: intro templates x names
    sentences = Counter(x for s in stories for x in re.split(r"(?<=\.)\s+", s.body))
    most_common, count = sentences.most_common(1)[0]
    assert count < 0.25 * len(stories), most_common


def _lines(path):
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


def test_write_corpus_layout_and_content(tmp_path):
    paths = write_corpus(tmp_path, "toy", n_train=50, n_val=7, n_chunks=3, seed=4)
    folder = tmp_path / "toy"
    assert paths == [folder / f"toy.chunk.0{k}.jsonl" for k in range(3)] + [folder / "toy.val.jsonl"]
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".toy.tmp")] == []
    chunks = [_lines(p) for p in paths[:3]]
    assert [len(c) for c in chunks] == [17, 17, 16]
    for k, chunk in enumerate(chunks):  # train story i is in chunk i % 3
        assert chunk == [make_story(4, i).text for i in range(k, 50, 3)]
    val = _lines(paths[3])
    assert len(val) == 7 and not set(val) & {t for c in chunks for t in c}
    # A later validation set starts with the same stories: it does not depend on n_train.
    other = write_corpus(tmp_path / "more", "toy", n_train=80, n_val=9, n_chunks=2, seed=4)
    assert _lines(other[-1])[:7] == val


def test_write_corpus_is_byte_identical_per_seed(tmp_path):
    a = write_corpus(tmp_path / "a", "s", n_train=40, n_val=5, n_chunks=2, seed=11)
    b = write_corpus(tmp_path / "b", "s", n_train=40, n_val=5, n_chunks=2, seed=11)
    c = write_corpus(tmp_path / "c", "s", n_train=40, n_val=5, n_chunks=2, seed=12)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert all(x.read_bytes() != y.read_bytes() for x, y in zip(a, c))


def test_rewrite_removes_chunks_the_new_layout_lacks(tmp_path):
    write_corpus(tmp_path, "s", n_train=40, n_val=5, n_chunks=4)
    (tmp_path / "s" / "notes.txt").write_text("kept")
    paths = write_corpus(tmp_path, "s", n_train=40, n_val=5, n_chunks=2)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted([p.name for p in paths] + ["notes.txt"])


def test_ensure_corpus_writes_once_and_keeps_existing_shards(tmp_path):
    first = ensure_corpus(tmp_path, "s", n_train=30, n_val=4, n_chunks=2)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in first}
    again = ensure_corpus(tmp_path, "s", n_train=60, n_val=9, n_chunks=3, seed=5)
    assert again == first
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in again} == before


def test_interrupted_write_leaves_no_shards(tmp_path, monkeypatch):
    calls = 0
    real = corpus.make_story

    def failing(seed, index):
        nonlocal calls
        calls += 1
        if calls > 25:
            raise KeyboardInterrupt
        return real(seed, index)

    monkeypatch.setattr(corpus, "make_story", failing)
    with pytest.raises(KeyboardInterrupt):
        write_corpus(tmp_path, "s", n_train=40, n_val=5, n_chunks=2)
    assert list(tmp_path.iterdir()) == []  # no shards, no temporary folder
    monkeypatch.setattr(corpus, "make_story", real)
    assert len(ensure_corpus(tmp_path, "s", n_train=40, n_val=5, n_chunks=2)) == 3


def test_ensure_corpus_from_two_processes_at_once(tmp_path):
    code = (
        "import sys; from lingua.synthetic import ensure_corpus; "
        "print(len(ensure_corpus(sys.argv[1], 's', n_train=3000, n_val=50, n_chunks=3)))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["4", "4"]
    expected = write_corpus(tmp_path / "ref", "s", n_train=3000, n_val=50, n_chunks=3)
    got = sorted((tmp_path / "s").iterdir())
    assert [p.read_bytes() for p in got] == [p.read_bytes() for p in sorted(expected)]


def test_default_corpus_time_and_size(tmp_path):
    start = time.time()
    paths = write_corpus(tmp_path)
    seconds = time.time() - start
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    print(f"\ndefault corpus: {len(paths) - 1} chunks + val, {megabytes:.1f} MB in {seconds:.1f} s")
    counts = [sum(1 for _ in open(p)) for p in paths]
    assert counts == [5000, 5000, 5000, 5000, 500]
