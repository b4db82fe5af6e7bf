"""`arith`: a bundled, synthetic, offline dataset of grade-school arithmetic word problems.

Each problem takes two or three steps (products, sums, differences, an exact division). The
response walks through the steps in one reasoning paragraph and ends with MetaMathQA's final line,
`The answer is: N`, so the same answer extraction works on it and on GSM8K-style data.

The problems are generated from templates, not collected: they exist so that demos, tests and the
convergence benchmark run with no network. They say nothing about real math benchmarks.

Generation is deterministic: the same (split, n, seed) gives the same problems on every machine
(Python's `random.Random` seeded with a string). The test split is drawn from its own stream and
any problem text that also appears in it is removed from the train split.
"""

from __future__ import annotations

import random
from collections.abc import Callable

NAME = "arith"
SPLITS = ("train", "test")
DEFAULT_SIZES = {"train": 2000, "test": 200}

NAMES = [("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Diego", "he"), ("Emma", "she"), ("Farid", "he"),
         ("Grace", "she"), ("Hiro", "he"), ("Ines", "she"), ("Jamal", "he"), ("Kira", "she"), ("Liam", "he")]
ITEMS = ["apples", "stickers", "marbles", "pencils", "cards", "stamps", "shells", "beads"]
Problem = tuple[str, str, int]  # (query, reasoning, answer)


def _buy_and_give(rng: random.Random) -> Problem:
    (name, she), (friend, _) = rng.sample(NAMES, 2)
    item = rng.choice(ITEMS)
    a, packs, per = rng.randint(3, 40), rng.randint(2, 9), rng.randint(2, 12)
    bought = packs * per
    total = a + bought
    given = rng.randint(1, total)
    query = (f"{name} has {a} {item}. {she.capitalize()} buys {packs} packs with {per} {item} in each pack, "
             f"then gives {given} {item} to {friend}. How many {item} does {name} have now?")
    steps = (f"{name} buys {packs} * {per} = {bought} {item}, so {she} has {a} + {bought} = {total} {item}. "
             f"After giving {given} to {friend}, {she} has {total} - {given} = {total - given} {item}.")
    return query, steps, total - given


def _wages(rng: random.Random) -> Problem:
    name, she = rng.choice(NAMES)
    rate, hours, days = rng.randint(5, 25), rng.randint(2, 8), rng.randint(2, 6)
    daily = rate * hours
    earned = daily * days
    spent = rng.randint(1, earned)
    query = (f"{name} earns ${rate} an hour and works {hours} hours a day for {days} days. "
             f"{she.capitalize()} then spends ${spent}. How many dollars does {name} have left?")
    steps = (f"Each day {name} earns {rate} * {hours} = {daily} dollars. Over {days} days that is "
             f"{daily} * {days} = {earned} dollars. After spending {spent}, {earned} - {spent} = {earned - spent}.")
    return query, steps, earned - spent


def _share(rng: random.Random) -> Problem:
    name, she = rng.choice(NAMES)
    friends, each = rng.randint(2, 8), rng.randint(2, 10)
    trays, per_tray = rng.randint(2, 6), rng.randint(6, 15)
    total = trays * per_tray
    if total < friends * each:  # keep the eaten count non-negative
        each = total // friends
    eaten = total - friends * each
    query = (f"{name} bakes {trays} trays of {per_tray} cookies. {she.capitalize()} eats {eaten} of them and "
             f"shares the rest equally among {friends} friends. How many cookies does each friend get?")
    steps = (f"{name} bakes {trays} * {per_tray} = {total} cookies. After eating {eaten}, {total} - {eaten} = "
             f"{total - eaten} are left. Shared among {friends} friends, each gets {total - eaten} / {friends} = "
             f"{each}.")
    return query, steps, each


def _library(rng: random.Random) -> Problem:
    shelves, per_shelf = rng.randint(3, 20), rng.randint(10, 40)
    boxes, per_box = rng.randint(2, 9), rng.randint(5, 25)
    have, new = shelves * per_shelf, boxes * per_box
    query = (f"A library has {shelves} shelves with {per_shelf} books on each shelf. It receives {boxes} boxes "
             f"of {per_box} books. How many books does the library have now?")
    steps = (f"The shelves hold {shelves} * {per_shelf} = {have} books. The boxes bring {boxes} * {per_box} = "
             f"{new} books. In total there are {have} + {new} = {have + new} books.")
    return query, steps, have + new


def _trip(rng: random.Random) -> Problem:
    s1, h1, s2, h2 = rng.randint(30, 90), rng.randint(1, 5), rng.randint(20, 80), rng.randint(1, 4)
    d1, d2 = s1 * h1, s2 * h2
    query = (f"A train travels at {s1} km per hour for {h1} hours, then at {s2} km per hour for {h2} hours. "
             f"How many kilometres does it travel in total?")
    steps = (f"First it covers {s1} * {h1} = {d1} km, then {s2} * {h2} = {d2} km. "
             f"Altogether {d1} + {d2} = {d1 + d2} km.")
    return query, steps, d1 + d2


TEMPLATES: list[Callable[[random.Random], Problem]] = [_buy_and_give, _wages, _share, _library, _trip]


def _stream(split: str, seed: int, n: int, exclude: set[str] = frozenset()) -> list[dict]:
    rng = random.Random(f"{NAME}/{split}/{seed}")  # str seeds are hashed with sha512: same on every machine
    seen, out = set(exclude), []
    while len(out) < n:
        query, steps, answer = rng.choice(TEMPLATES)(rng)
        if query in seen:
            continue
        seen.add(query)
        out.append({"query": query, "response": f"{steps}\nThe answer is: {answer}", "answer": str(answer)})
    return out


def arith_problems(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """`n` problems of `split` as MetaMathQA-style records {query, response, answer}.

    The train split never contains a query of the default-size (first 200) test problems of the same seed.
    """
    from ..errors import PissaError

    if split not in SPLITS:
        raise PissaError(f"the {NAME} dataset has splits {', '.join(SPLITS)}, not {split!r}")
    n = DEFAULT_SIZES[split] if n is None else n
    if n <= 0:
        raise PissaError(f"number of {NAME} problems must be > 0, got {n}")
    if split == "test":
        return _stream("test", seed, n)
    test_queries = {r["query"] for r in _stream("test", seed, DEFAULT_SIZES["test"])}
    return _stream("train", seed, n, exclude=test_queries)


def arith_preferences(split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """Preference records {prompt, chosen, rejected} from the same problems: chosen is the correct response,
    rejected the same reasoning ending in a wrong final answer (off by 1 to 9, seeded), as chat turns."""
    rng = random.Random(f"{NAME}/preferences/{split}/{seed}")
    out = []
    for record in arith_problems(split, n, seed):
        answer = int(record["answer"])
        wrong = answer + rng.choice([-1, 1]) * rng.randint(1, 9)
        steps = record["response"].rsplit("\n", 1)[0]
        out.append({"prompt": [{"role": "user", "content": record["query"]}],
                    "chosen": [{"role": "assistant", "content": record["response"]}],
                    "rejected": [{"role": "assistant", "content": f"{steps}\nThe answer is: {wrong}"}]})
    return out
