"""The story grammar of the offline corpus: `make_story(seed, index)` is a pure function where
characters move between places and pick up, give, hide and leave objects, ending with questions
whose answers are the latest state; `story_indices` numbers the stories of each split. The corpus
files (`corpus.py`) and the evaluation tasks (setup/make_eval_tasks.py) are built from it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

QuestionKind = Literal["where_object", "who_has", "where_person", "what_given", "where_before"]
Split = Literal["train", "val", "test"]

# Each split draws its stories from its own index range (split k: k * SPLIT_SIZE onwards), so the
# splits never share a story and the validation set does not change when the training set grows.
SPLITS: tuple[Split, ...] = ("train", "val", "test")
SPLIT_SIZE = 1_000_000_000
_MIN_EVENTS = 3  # state changes every story tells, however short

NAMES = (
    "Mia", "Leo", "Sam", "Ava", "Noah", "Lily", "Omar", "Zoe", "Ben", "Ella", "Finn", "Ruby", "Max",
    "Nora", "Theo", "Ivy", "Kai", "Luna", "Hugo", "Iris", "Jack", "Maya", "Eli", "Rosa", "Tom",
    "Anna", "Ravi", "Lucy", "Amir", "Chloe", "Dan", "Emma", "Felix", "Grace", "Hana", "Ian",
    "Jade", "Karl", "Lena", "Milo", "Nina", "Oscar", "Pia", "Quinn", "Rex", "Sara", "Tariq",
    "Uma", "Victor", "Wendy", "Yusuf", "Zara", "Aiko", "Bruno", "Carla", "Dev", "Elsa", "Farah",
    "Gus", "Heidi", "Isla", "Jonas", "Kira", "Liam", "Mei", "Nico", "Olga", "Paul", "Rita",
    "Sofia", "Tess", "Ugo", "Vera", "Will", "Xena", "Yara", "Zack", "Abel", "Bea", "Cole", "Dora",
    "Ezra", "Fay", "Gita", "Hal", "Ines", "Joel", "Kemi", "Lars", "Mara", "Ned", "Opal", "Pedro",
    "Rhea", "Seth", "Tara", "Uri", "Val", "Wes", "Yuki", "Ada", "Bo", "Cyrus", "Daisy", "Emil",
    "Flora", "Gabe", "Hope", "Ida", "Jin", "Kofi", "Lola", "Malik", "Nell", "Otto", "Priya",
    "Reza", "Suki", "Tobias", "Vince", "Wren", "Yasmin", "Arlo", "Bella", "Chen", "Dina", "Enzo",
    "Freya", "Gil", "Hattie", "Ike", "Juno", "Kenji", "Leah", "Mateo", "Nadia", "Orla", "Pablo",
    "Raj", "Selma", "Tomas", "Ulla", "Vik", "Willa", "Yosef", "Alma", "Boris", "Cleo", "Dario",
    "Edie", "Fatima", "Gwen", "Hector", "Ilse", "Jorge", "Kaya", "Lotte", "Mona", "Nils", "Odette",
)

# (where the story happens, its short name, the places it has)
SETTINGS = (
    ("on a small farm", "farm",
     ("kitchen", "barn", "garden", "shed", "meadow", "orchard", "porch", "stable")),
    ("in a big old house", "house",
     ("kitchen", "bedroom", "attic", "cellar", "living room", "hallway", "garden", "garage")),
    ("at a busy school", "school",
     ("classroom", "library", "playground", "hall", "gym", "music room", "art room", "office")),
    ("in an old castle", "castle",
     ("tower", "great hall", "courtyard", "kitchen", "armory", "chapel", "garden", "stable")),
    ("in a quiet village", "village",
     ("bakery", "market", "square", "park", "post office", "mill", "inn", "library")),
    ("in a seaside town", "town",
     ("harbor", "lighthouse", "cafe", "market", "boathouse", "fish shop", "beach hut", "ice cream shop")),
    ("at a forest camp", "camp",
     ("cabin", "tent", "clearing", "woodshed", "boathouse", "meadow", "cave", "hut")),
    ("in a toy shop", "shop",
     ("front room", "back room", "workshop", "storeroom", "shop window", "basement", "office", "yard")),
)

CONTAINERS = (
    "box", "basket", "drawer", "bag", "chest", "cupboard", "bucket", "jar", "backpack", "suitcase",
    "bowl", "crate", "tin", "barrel", "sack", "trunk", "cabinet", "pot", "shoebox", "wardrobe",
)

OBJECTS = (
    "apple", "ball", "book", "key", "coin", "kite", "hat", "cup", "spoon", "shell", "stone",
    "feather", "map", "lamp", "doll", "drum", "flute", "ribbon", "candle", "letter", "teddy bear",
    "toy car", "puzzle", "compass", "clock", "ring", "scarf", "glove", "umbrella", "sandwich",
    "orange", "pear", "banana", "cookie", "crayon", "pencil", "notebook", "marble", "whistle",
    "bell", "flag", "brush", "mirror", "necklace", "blanket", "pillow", "bottle", "robot", "boat",
    "trumpet", "yo-yo", "camera", "sock", "button", "acorn", "lemon", "carrot", "egg", "comb",
)

ADJECTIVES = (
    "red", "blue", "green", "yellow", "shiny", "old", "little", "tiny", "big", "small",
    "new", "purple", "pink", "brown", "white", "black", "dusty", "lovely", "strange", "special",
)

# Sentence templates. Fields: x, y characters; p a place; o an object; c, d containers.
_INTRO = (
    "Once upon a time, {names} lived {setting}.",
    "{names} were good friends who lived {setting}.",
    "{setting}, there lived {names}.",
    "This is a story about {names}, who all lived {setting}.",
)
_PLACES = ("The {short} had {places}.", "There was {places} in the {short}.")
_CONTAINER_AT = ("In the {p} there was a {c}.", "A {c} stood in the {p}.", "There was a big {c} in the {p}.")
_OBJECT_IN_CONTAINER = (
    "{a_adj_o} was in the {c}.", "There was {a_o} in the {c}.", "Someone had put {a_o} in the {c}.",
)
_OBJECT_IN_PLACE = ("{a_adj_o} lay in the {p}.", "Someone had left {a_o} in the {p}.", "There was {a_o} in the {p}.")
_OBJECT_HELD = ("{x} had {a_adj_o}.", "{x} was holding {a_o}.")
_PERSON_AT = (
    "{x} was in the {p}.", "{x} was playing in the {p}.", "{x} was resting in the {p}.",
    "{x} started the day in the {p}.",
)
_PEOPLE_AT = ("{names} were in the {p}.", "{names} were playing in the {p}.", "{names} started the day in the {p}.")
_MOVE = (
    "{x} went to the {p}.", "{x} walked to the {p}.", "{x} ran to the {p}.", "Then {x} went over to the {p}.",
    "After a while, {x} wandered into the {p}.", "{x} hurried to the {p}.", "Later, {x} moved to the {p}.",
)
_MOVE_TWO = ("{x} and {y} went to the {p} together.", "{x} and {y} walked to the {p}.")
_PICK_FROM_PLACE = ("{x} picked up the {o}.", "{x} noticed the {o} and picked it up.", "{x} grabbed the {o}.")
_PICK_FROM_CONTAINER = (
    "{x} took the {o} out of the {c}.", "{x} found the {o} in the {c} and took it.",
    "{x} opened the {c} and took the {o}.",
)
_GIVE = (
    "{x} gave the {o} to {y}.", "{x} handed the {o} to {y}.", "{x} passed the {o} to {y}.",
    "'This is for you,' said {x}, and gave the {o} to {y}.",
)
_PUT = (
    "{x} put the {o} in the {c}.", "{x} placed the {o} inside the {c}.", "{x} hid the {o} in the {c}.",
    "{x} dropped the {o} into the {c}.",
)
_LEAVE = ("{x} left the {o} in the {p}.", "{x} put the {o} down in the {p}.", "{x} set the {o} down in the {p}.")
_SHIFT = ("{x} took the {o} out of the {c} and put it in the {d}.", "{x} moved the {o} from the {c} to the {d}.")
_FILLER_PERSON = (
    "{x} smiled.", "{x} was very happy.", "{x} laughed and clapped.", "'What a nice day!' said {x}.",
    "{x} felt a little tired.", "{x} sang a little song.", "{x} looked out of the window.",
    "{x} was hungry and ate a snack.", "{x} yawned.", "{x} hummed a tune.", "{x} thought about the weekend.",
)
_FILLER_PAIR = (
    "{x} waved to {y}.", "{x} wanted to play a game with {y}.", "{x} and {y} talked about the weather.",
    "{x} told {y} a funny joke.", "'Hello, {y}!' said {x}.",
)
_FILLER_OBJECT = ("The {o} was {adj}.", "{x} liked the {o} very much.", "{x} said that the {o} was {adj}.")
_FILLER_WORLD = (
    "The sun was shining.", "A cool wind was blowing.", "Outside, it started to rain.",
    "Birds were singing in the trees.", "It was a quiet afternoon.", "Clouds drifted across the sky.",
)
_STILL_AT = ("{x} was still in the {p}.",)
_ENDING = (
    "Soon it was time for dinner.", "It had been a busy day.", "Everyone was tired but happy.",
    "That night, everyone slept well.", "And that was the end of the day.",
)
_QUESTION = {
    "where_object": "Where is the {o}?",
    "who_has": "Who has the {o}?",
    "where_person": "Where is {x}?",
    "what_given": "What did {x} give to {y}?",
    "where_before": "Where was the {o} before {x} took it?",
}


@dataclass(frozen=True)
class Question:
    """One question about a story: the answer and three wrong answers of the same form."""

    kind: QuestionKind
    question: str  # "Where is the apple?"
    answer: str  # "in the basket", "Mia", "the ball"
    distractors: tuple[str, str, str]  # entities of the same story, all wrong

    @property
    def prompt(self) -> str:
        """The question as it appears in the text, up to the answer: "Q: Where is the apple? A:"."""
        return f"Q: {self.question} A:"

    @property
    def line(self) -> str:
        """The question with its answer, as the story text ends with it."""
        return f"{self.prompt} {self.answer}."


@dataclass(frozen=True)
class Story:
    """A generated story: the narrative and the questions that follow it."""

    body: str  # the narrative, before the questions
    questions: tuple[Question, ...]

    @property
    def text(self) -> str:
        """The training document: the narrative, a blank line, then one question per line."""
        return self.body + "\n\n" + "\n".join(q.line for q in self.questions)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _listing(items: list[str]) -> str:
    return ", ".join(items[:-1]) + " and " + items[-1]


class _StoryBuilder:
    """The world state of one story and the sentences told so far."""

    def __init__(self, rng: random.Random, long_story: bool) -> None:
        self.rng = rng
        self.sentences: list[str] = []
        self.words = 0
        setting, short, all_places = rng.choice(SETTINGS)
        # Short stories get a small cast so that the introduction leaves room for events.
        big = 1 if long_story else 0
        self.places = rng.sample(all_places, rng.randint(4, 4 + big))
        self.people = rng.sample(NAMES, rng.randint(4, 4 + big))
        self.actors = self.people[: rng.randint(2, 3 + big)]
        self.containers = rng.sample(CONTAINERS, rng.randint(1 + big, 2 + 2 * big))
        self.objects = rng.sample(OBJECTS, rng.randint(3, 4 + big))
        self.container_place = {c: rng.choice(self.places) for c in self.containers}
        self.person_place: dict[str, str] = {}
        self.holder: dict[str, str | None] = {}  # object -> character holding it
        self.spot: dict[str, str] = {}  # object -> container or place it is in, when not held
        self.gives: list[tuple[str, str, str]] = []  # (giver, receiver, object)
        self.pickups: list[tuple[str, str, str]] = []  # (taker, object, where it was)
        self.shifts: list[tuple[str, str]] = []  # (mover, object): moved between containers
        self._introduce(setting, short)

    def say(self, template: str, **fields: str) -> None:
        sentence = template.format(**fields)
        sentence = sentence[0].upper() + sentence[1:]
        self.sentences.append(sentence)
        self.words += len(sentence.split())

    def _introduce(self, setting: str, short: str) -> None:
        rng = self.rng
        names = rng.sample(self.people, len(self.people))
        self.say(rng.choice(_INTRO), names=_listing(names), setting=setting)
        self.say(rng.choice(_PLACES), short=short, places=_listing([_article(p) for p in self.places]))
        for c in self.containers:
            self.say(rng.choice(_CONTAINER_AT), c=c, p=self.container_place[c])
        groups: dict[str, list[str]] = {}
        for x in self.people:
            self.person_place[x] = rng.choice(self.places)
            groups.setdefault(self.person_place[x], []).append(x)
        for p, xs in groups.items():
            if len(xs) == 1:
                self.say(rng.choice(_PERSON_AT), x=xs[0], p=p)
            else:
                self.say(rng.choice(_PEOPLE_AT), names=_listing(xs), p=p)
        for o in self.objects:
            adj = rng.choice(ADJECTIVES)
            fields = {"o": o, "a_o": _article(o), "a_adj_o": _article(f"{adj} {o}")}
            roll = rng.random()
            if roll < 0.45:
                c = rng.choice(self.containers)
                self.holder[o], self.spot[o] = None, c
                self.say(rng.choice(_OBJECT_IN_CONTAINER), c=c, **fields)
            elif roll < 0.8:
                p = rng.choice(self.places)
                self.holder[o], self.spot[o] = None, p
                self.say(rng.choice(_OBJECT_IN_PLACE), p=p, **fields)
            else:
                x = rng.choice(self.actors)
                self.holder[o] = x
                self.say(rng.choice(_OBJECT_HELD), x=x, **fields)

    def _actions(self, x: str) -> list[tuple[float, str, tuple[str, ...]]]:
        """What character x can do in the current state, each with a weight."""
        here = self.person_place[x]
        actions: list[tuple[float, str, tuple[str, ...]]] = []
        bins = [c for c in self.containers if self.container_place[c] == here]
        company = [y for y in self.people if y != x and self.person_place[y] == here]
        draw = {p: 0.5 for p in self.places if p != here}
        for y in self.people:
            if self.person_place[y] in draw:
                draw[self.person_place[y]] += 1.0
        for o in self.objects:
            holder = self.holder[o]
            if holder == x:
                actions.extend((3.0, "give", (x, o, y)) for y in company)
                actions.extend((1.5, "put", (x, o, c)) for c in bins)
                actions.append((0.7, "leave", (x, o, here)))
            elif holder is None:
                spot = self.spot[o]
                where = self.container_place.get(spot, spot)
                if where == here:
                    actions.append((3.0, "pick", (x, o)))
                    if spot in self.container_place:
                        actions.extend((1.0, "shift", (x, o, spot, d)) for d in bins if d != spot)
                else:
                    draw[where] += 1.0
        # Going where someone or something is makes gives and pickups possible: weight it up.
        actions.extend((w, "move", (x, p)) for p, w in draw.items())
        return actions

    def step(self) -> bool:
        """Tells one more sentence; returns whether it changed the state."""
        rng = self.rng
        if rng.random() < 0.22:
            self._filler()
            return False
        actions = self._actions(rng.choice(self.actors))
        _, kind, args = rng.choices(actions, weights=[w for w, _, _ in actions])[0]
        if kind == "move":
            x, p = args
            company = [y for y in self.people if y != x and self.person_place[y] == self.person_place[x]]
            if company and rng.random() < 0.25:
                y = rng.choice(company)
                self.person_place[x] = self.person_place[y] = p
                self.say(rng.choice(_MOVE_TWO), x=x, y=y, p=p)
            else:
                self.person_place[x] = p
                self.say(rng.choice(_MOVE), x=x, p=p)
        elif kind == "pick":
            x, o = args
            spot = self.spot[o]
            self.pickups.append((x, o, spot))
            self.holder[o] = x
            if spot in self.container_place:
                self.say(rng.choice(_PICK_FROM_CONTAINER), x=x, o=o, c=spot)
            else:
                self.say(rng.choice(_PICK_FROM_PLACE), x=x, o=o)
        elif kind == "give":
            x, o, y = args
            self.gives.append((x, y, o))
            self.holder[o] = y
            self.say(rng.choice(_GIVE), x=x, o=o, y=y)
        elif kind == "put":
            x, o, c = args
            self.holder[o], self.spot[o] = None, c
            self.say(rng.choice(_PUT), x=x, o=o, c=c)
        elif kind == "leave":
            x, o, p = args
            self.holder[o], self.spot[o] = None, p
            self.say(rng.choice(_LEAVE), x=x, o=o, p=p)
        else:  # shift: from one container to another in the same place
            x, o, c, d = args
            self.shifts.append((x, o))
            self.spot[o] = d
            self.say(rng.choice(_SHIFT), x=x, o=o, c=c, d=d)
        return True

    def _filler(self) -> None:
        rng = self.rng
        x = rng.choice(self.actors)
        y = rng.choice([p for p in self.people if p != x])
        kind = rng.randrange(5)
        if kind == 0:
            self.say(rng.choice(_FILLER_PERSON), x=x)
        elif kind == 1:
            self.say(rng.choice(_FILLER_PAIR), x=x, y=y)
        elif kind == 2:
            self.say(rng.choice(_FILLER_OBJECT), x=x, o=rng.choice(self.objects), adj=rng.choice(ADJECTIVES))
        elif kind == 3:
            self.say(rng.choice(_FILLER_WORLD))
        else:
            self.say(rng.choice(_STILL_AT), x=x, p=self.person_place[x])

    def _wrong_spots(self, answer_spot: str) -> list[str]:
        """Containers and places the object is not in (the place holding its container is not wrong)."""
        where = self.container_place.get(answer_spot, answer_spot)
        spots = [c for c in self.containers if c != answer_spot]
        spots += [p for p in self.places if p != where]
        return [f"in the {s}" for s in spots]

    def questions(self, count: int) -> tuple[Question, ...]:
        """Up to `count` questions about the final state (or the history), with distinct subjects."""
        rng = self.rng
        candidates: list[tuple[QuestionKind, str, str, str, list[str]]] = []  # kind, subject, question, answer, wrong
        for o in self.objects:
            x = self.holder[o]
            if x is None:
                spot = self.spot[o]
                q = _QUESTION["where_object"].format(o=o)
                candidates.append(("where_object", o, q, f"in the {spot}", self._wrong_spots(spot)))
            else:
                q = _QUESTION["who_has"].format(o=o)
                candidates.append(("who_has", o, q, x, [y for y in self.people if y != x]))
        for x in self.people:
            p = self.person_place[x]
            q = _QUESTION["where_person"].format(x=x)
            candidates.append(("where_person", x, q, f"in the {p}", [f"in the {r}" for r in self.places if r != p]))
        if len(self.objects) >= 4:
            for x, y, o in self.gives:
                if sum(g[:2] == (x, y) for g in self.gives) == 1:
                    q = _QUESTION["what_given"].format(x=x, y=y)
                    wrong = [f"the {r}" for r in self.objects if r != o]
                    candidates.append(("what_given", f"{x}>{y}", q, f"the {o}", wrong))
        for x, o, spot in self.pickups:
            # "took it" must name one event: x picked o up once, never moved it or received it.
            took = sum(t[:2] == (x, o) for t in self.pickups) + self.shifts.count((x, o))
            received = any(g[1:] == (x, o) for g in self.gives)
            if took == 1 and not received:
                q = _QUESTION["where_before"].format(o=o, x=x)
                candidates.append(("where_before", f"{x}<{o}", q, f"in the {spot}", self._wrong_spots(spot)))
        rng.shuffle(candidates)
        chosen: list[Question] = []
        subjects: set[str] = set()
        # Questions about people are the most common; take one of them first pass, more only to fill.
        for pass_ in range(2):
            for kind, subject, q, answer, wrong in candidates:
                if len(chosen) == count:
                    return tuple(chosen)
                if subject in subjects or len(wrong) < 3:
                    continue
                if pass_ == 0 and kind == "where_person" and any(c.kind == kind for c in chosen):
                    continue
                subjects.add(subject)
                chosen.append(Question(kind, q, answer, tuple(rng.sample(wrong, 3))))
        return tuple(chosen)

    def body(self) -> str:
        """Sentences grouped into paragraphs of 3-6 sentences."""
        paragraphs, start = [], 0
        while start < len(self.sentences):
            end = start + self.rng.randint(3, 6)
            paragraphs.append(" ".join(self.sentences[start:end]))
            start = end
        return "\n\n".join(paragraphs)


def make_story(seed: int, index: int) -> Story:
    """Story number `index` of the corpus `seed`: the same pair always gives the same story."""
    rng = random.Random(f"lingua-stories:{seed}:{index}")
    n_questions = rng.randint(2, 4)
    target_words = rng.randint(70, 300) - 8 * n_questions
    builder = _StoryBuilder(rng, long_story=target_words > 150)
    events = 0
    while builder.words < target_words - 8 or events < _MIN_EVENTS:
        events += builder.step()
    builder.say(rng.choice(_ENDING))
    return Story(builder.body(), builder.questions(n_questions))


def story_indices(split: Split, n: int) -> range:
    """The story indices of the first `n` stories of a split."""
    if not 0 <= n <= SPLIT_SIZE:
        raise ValueError(f"n={n}: a split holds between 0 and {SPLIT_SIZE} stories")
    start = SPLITS.index(split) * SPLIT_SIZE
    return range(start, start + n)
