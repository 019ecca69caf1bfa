"""Built-in procedural tasks, written by this project, so the default run needs no external data.

Each task is a seeded generator: the same (task, split, n) always yields the same examples, and
the eval split never shares an input with the train split.
"""

from __future__ import annotations

import calendar
import random
from collections.abc import Callable
from dataclasses import dataclass

from tunelab.data.example import Example

Sample = tuple[str, list[str]]  # (input, references); references[0] is the training target

FIRST_NAMES = ["Anna", "Bilal", "Chen", "Dara", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas", "Kemi",
               "Liam", "Maya", "Nikhil", "Olga", "Pablo", "Qiu", "Rosa", "Sven", "Tariq", "Uma", "Viktor",
               "Wen", "Ximena", "Yusuf", "Zoe"]
CITIES = ["Lisbon", "Nairobi", "Osaka", "Toronto", "Lyon", "Krakow", "Austin", "Hanoi", "Porto", "Dublin",
          "Quito", "Tunis", "Bergen", "Cusco", "Perth", "Seville", "Zagreb", "Leeds", "Da Nang", "Malmo"]


@dataclass(frozen=True)
class BuiltinTask:
    name: str
    instruction: str
    sample: Callable[[random.Random], Sample]
    metrics: tuple[str, ...]
    options: tuple[str, ...] = ()
    description: str = ""

    def examples(self, split: str, n: int) -> list[Example]:
        """``n`` examples of ``split`` ("train" or "eval"); eval inputs never occur in train."""
        seen_train = set() if split == "train" else {e.input for e in self.examples("train", TRAIN_SIZE)}
        rng = random.Random(f"tunelab:{self.name}:{split}")
        out: list[Example] = []
        seen: set[str] = set()
        for _ in range(n * 50):
            if len(out) == n:
                break
            text, refs = self.sample(rng)
            if text in seen or text in seen_train:
                continue
            seen.add(text)
            out.append(Example(id=f"{self.name}-{split}-{len(out):04d}", task=self.name,
                               instruction=self.instruction, input=text, output=refs[0],
                               references=tuple(refs), options=self.options))
        return out


TRAIN_SIZE = 1000


def _date(rng: random.Random) -> Sample:
    year, month = rng.randint(1950, 2049), rng.randint(1, 12)
    day = rng.randint(1, calendar.monthrange(year, month)[1])
    return f"{year:04d}-{month:02d}-{day:02d}", [f"{calendar.month_name[month]} {day}, {year}"]


ITEMS = ["apples", "stamps", "marbles", "books", "pencils", "cookies", "shells", "coins"]


def _arithmetic(rng: random.Random) -> Sample:
    name, item = rng.choice(FIRST_NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    kind = rng.choice(["add", "sub", "mul"])
    if kind == "add":
        q, ans = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    elif kind == "sub":
        a = a + b
        q, ans = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        q, ans = f"{name} fills {a} bags with {b} {item} each. How many {item} is that in total?", a * b
    return q, [str(ans)]


RESTAURANTS = ["The Olive Tree", "Blue Lantern", "Casa Verde", "The Copper Pot", "Saffron House", "Little Fig",
               "The Salt Cellar", "Moonfish", "Green Door", "The Oak Room", "Pepper Mill", "Harbour Lights"]
FOODS = ["Italian", "Indian", "Japanese", "French", "Mexican", "Thai", "Greek", "Lebanese"]
AREAS = ["city centre", "riverside", "old town", "harbour"]
PRICES = ["cheap", "moderately priced", "expensive"]
RATINGS = ["low", "average", "high"]


def _restaurant(rng: random.Random) -> Sample:
    name, food, area, price = rng.choice(RESTAURANTS), rng.choice(FOODS), rng.choice(AREAS), rng.choice(PRICES)
    rating = rng.choice(RATINGS)
    mr = f"name[{name}], food[{food}], area[{area}], price[{price}], rating[{rating}]"
    refs = [f"{name} is a {price} {food} restaurant in the {area} with a {rating} customer rating.",
            f"In the {area}, {name} serves {food} food, is {price} and has a {rating} rating.",
            f"{name} offers {price} {food} food in the {area} area and is rated {rating} by customers."]
    return mr, refs


SENTENCES = ["{p} moved to {c} last spring to start a new job.", "Yesterday {p} gave a talk in {c}.",
             "After years abroad, {p} finally returned to {c}.", "The festival in {c} was organised by {p}.",
             "{p} said the trains in {c} were always on time.", "A bakery in {c} hired {p} as head chef."]


def _entities(rng: random.Random) -> Sample:
    person, city = rng.choice(FIRST_NAMES), rng.choice(CITIES)
    return rng.choice(SENTENCES).format(p=person, c=city), [f"{person} | {city}"]


POSITIVE = ["wonderful", "excellent", "delightful", "superb", "charming", "fantastic", "lovely", "brilliant"]
NEGATIVE = ["terrible", "awful", "disappointing", "dreadful", "boring", "mediocre", "annoying", "poor"]
THINGS = ["film", "hotel", "meal", "book", "concert", "phone", "course", "game", "museum", "album", "bike",
          "podcast"]
ADVERBS = ["", "really ", "truly ", "quite ", "absolutely ", "rather "]
REVIEWS = ["The {t} was {a}.", "What a {a} {t}, honestly.", "I found the {t} {a} from start to finish.",
           "My friends and I thought this {t} was {a}.", "Overall, a {a} {t}.", "This {t}? {A}, I would say.",
           "We tried the {t} last week and it was {a}."]


def _sentiment(rng: random.Random) -> Sample:
    label = rng.choice(["positive", "negative"])
    adjective = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
    adjective = rng.choice(ADVERBS) + adjective
    text = rng.choice(REVIEWS).format(t=rng.choice(THINGS), a=adjective, A=adjective.capitalize())
    return text, [label]


TASKS: dict[str, BuiltinTask] = {t.name: t for t in [
    BuiltinTask("date_format", "Rewrite the date in the form 'Month D, YYYY'.", _date, ("exact_match", "rouge_l"),
                description="ISO date -> long English date"),
    BuiltinTask("arithmetic", "Solve the word problem. Answer with the number only.", _arithmetic,
                ("exact_match",), description="one-step arithmetic word problems"),
    BuiltinTask("restaurant_d2t", "Write one sentence describing the restaurant from its attributes.",
                _restaurant, ("bleu", "rouge_l"), description="attribute list -> sentence (3 references)"),
    BuiltinTask("entity_extraction", "Name the person and the city in the sentence, as 'person | city'.",
                _entities, ("exact_match", "token_f1"), description="extract a person and a city"),
    BuiltinTask("sentiment", "Is the review positive or negative?", _sentiment, ("accuracy",),
                options=("positive", "negative"), description="binary sentiment with an explicit options list"),
]}
