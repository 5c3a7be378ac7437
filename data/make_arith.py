"""Generate the bundled arithmetic word-problem task (stdlib only, seeded, deterministic).

    python data/make_arith.py --seed 0 --n-train 4000 --n-test 200 --n-ood 200 --out data/arith

Writes `train.jsonl`, `test.jsonl` and `ood.jsonl`, one conversation per line:

    {"messages": [{"role": "user", "content": "Tom has 23 apples and buys 14 more. ..."},
                  {"role": "assistant", "content": "Tom starts with 23 apples. 23 + 14 = 37. 37 - 9 = 28.\\n#### 28"}],
     "answer": "28"}

The user turn is the problem, on a third of them after a preamble ("Solve this word problem.") and on a third
followed by an answer-format instruction ("Think step by step."); twelve stories in 20 templates of one, two or three
steps, most stories told with more than one number of steps (so the steps are counted from the stated quantities). The
answer format ("#### <integer>" on the last line) is taught by SFT, so a base model is scored with a last-number
fallback (see common/rewards.py). Every step of a solution is written as "a op b = c" with op in + - * / so tests
can re-check the arithmetic without the generator. All intermediate values are non-negative integers and every
division is exact.

The test split is drawn first from the same random stream and train skips any problem text already in test,
so the two never share a problem and the test split does not change when --n-train does.

`ood.jsonl` is an out-of-distribution split: OOD_TEMPLATES, which training never uses (other stories and phrasings,
one-step problems asked differently, 43% three-step problems against training's 16%), and for half of them an
answer-format instruction that training never shows. It comes from its own random stream: the training templates
can change without changing it. The scripts answer it before and after training beside
test.jsonl: a gain on test that does not carry over to it is the model learning the bundled phrasing rather than the
arithmetic.
"""

import argparse
import json
import os
import random

NAMES = [
    "Tom",
    "Ann",
    "Mia",
    "Sam",
    "Leo",
    "Zoe",
    "Max",
    "Eva",
    "Ben",
    "Lily",
    "Noah",
    "Emma",
    "Jack",
    "Ruby",
    "Omar",
    "Nina",
]
OBJECTS = [
    "apples",
    "pencils",
    "stickers",
    "marbles",
    "cookies",
    "books",
    "cards",
    "shells",
    "stamps",
    "candies",
    "toys",
    "coins",
]
GOODS = ["pen", "notebook", "ball", "cup", "kite", "hat", "sandwich", "toy car", "comb", "ruler"]
CONTAINERS = ["boxes", "bags", "jars", "baskets", "packs"]


def _op(a, op, b):
    """Return (result, equation text) for one step; '-' and '/' callers guarantee a valid integer result."""
    result = {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
    return result, f"{a} {op} {b} = {result}."


def buy_and_give(rng, max_n):
    """has a, gains b, gives away c (c <= a + b)."""
    name, other, obj = rng.choice(NAMES), rng.choice(NAMES), rng.choice(OBJECTS)
    while other == name:
        other = rng.choice(NAMES)
    a, b = rng.randint(2, max_n), rng.randint(2, max_n)
    total, eq1 = _op(a, "+", b)
    c = rng.randint(1, total - 1)
    left, eq2 = _op(total, "-", c)
    problem = (
        f"{name} has {a} {obj} and buys {b} more. {name} gives {c} to {other}. How many {obj} does {name} have now?"
    )
    return problem, f"{name} starts with {a} {obj}. {eq1} {eq2}", left


def sell_twice(rng, max_n):
    """a shop has a, sells b then c (b + c <= a)."""
    obj = rng.choice(OBJECTS)
    a = rng.randint(5, max_n + 20)
    b = rng.randint(1, a // 2)
    c = rng.randint(1, a - b)
    mid, eq1 = _op(a, "-", b)
    left, eq2 = _op(mid, "-", c)
    problem = f"A shop has {a} {obj}. It sells {b} in the morning and {c} in the afternoon. How many {obj} are left?"
    return problem, f"The shop starts with {a} {obj}. {eq1} {eq2}", left


def buy_items(rng, max_n):
    """n items at p dollars each, optionally paid with a bill and asked for change."""
    name, good = rng.choice(NAMES), rng.choice(GOODS)
    count, price = rng.randint(2, 9), rng.randint(2, 12)
    cost, eq1 = _op(count, "*", price)
    problem = f"Each {good} costs {price} dollars. {name} buys {count} of them."
    if rng.random() < 0.5:
        return problem + f" How many dollars does {name} pay?", eq1, cost
    bill = rng.choice([b for b in (20, 50, 100, 200) if b >= cost])
    change, eq2 = _op(bill, "-", cost)
    problem += f" {name} pays with a {bill} dollar bill. How many dollars of change does {name} get?"
    return problem, f"{eq1} {eq2}", change


def share_equally(rng, max_n):
    """a items (optionally after getting b more) shared equally among k friends: exact division."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    friends, each = rng.randint(2, 9), rng.randint(2, 12)
    total = friends * each
    if rng.random() < 0.5:
        problem = (
            f"{name} has {total} {obj} and shares them equally among {friends} friends. "
            f"How many {obj} does each friend get?"
        )
        share, eq = _op(total, "/", friends)
        return problem, eq, share
    extra = rng.randint(1, total - 1)
    start = total - extra
    problem = (
        f"{name} has {start} {obj} and finds {extra} more. {name} shares all of them equally "
        f"among {friends} friends. How many {obj} does each friend get?"
    )
    total, eq1 = _op(start, "+", extra)
    share, eq2 = _op(total, "/", friends)
    return problem, f"{eq1} {eq2}", share


def containers(rng, max_n):
    """k containers with m each, plus or minus a few loose ones."""
    name, obj, box = rng.choice(NAMES), rng.choice(OBJECTS), rng.choice(CONTAINERS)
    k, m = rng.randint(2, 9), rng.randint(2, 12)
    total, eq1 = _op(k, "*", m)
    if rng.random() < 0.5:
        extra = rng.randint(1, max_n // 2)
        final, eq2 = _op(total, "+", extra)
        problem = (
            f"{name} has {k} {box} with {m} {obj} in each and {extra} more loose {obj}. "
            f"How many {obj} does {name} have in total?"
        )
    else:
        lost = rng.randint(1, total - 1)
        final, eq2 = _op(total, "-", lost)
        problem = (
            f"{name} has {k} {box} with {m} {obj} in each. {name} loses {lost} {obj}. "
            f"How many {obj} does {name} have left?"
        )
    return problem, f"{name} has {k} {box} of {m}. {eq1} {eq2}", final


def compare_together(rng, max_n):
    """x has a, y has b more (or fewer) than x; how many together."""
    obj = rng.choice(OBJECTS)
    x, y = rng.sample(NAMES, 2)
    a, d = rng.randint(5, max_n), rng.randint(1, max_n // 2)
    if rng.random() < 0.5:
        b, eq1 = _op(a, "+", d)
        relation = "more"
    else:
        d = min(d, a - 1)
        b, eq1 = _op(a, "-", d)
        relation = "fewer"
    together, eq2 = _op(a, "+", b)
    problem = f"{x} has {a} {obj}. {y} has {d} {relation} {obj} than {x}. How many {obj} do they have together?"
    return problem, f"{y} has {eq1[:-1]} {obj}. {eq2}", together


# Broadened in issue 18 (SFT learned the six stories above and nothing beyond them: 0.10 on the OOD split): six more
# stories, one- and three-step structures, and on part of the problems a preamble and an answer-format instruction.
# None of them is an OOD story or instruction; the OOD split still mixes its structures differently (two of its five
# templates are three-step, three of the twenty in TEMPLATES).
def library_books(rng, max_n):
    """two steps: a library lends some books out and gets others back."""
    a = rng.randint(20, max_n + 40)
    out = rng.randint(1, a - 1)
    b = rng.randint(1, out)
    mid, eq1 = _op(a, "-", out)
    now, eq2 = _op(mid, "+", b)
    problem = (
        f"A library has {a} books on its shelves. On Monday it lends out {out} books, and on Tuesday {b} of them are "
        "returned. How many books are on the shelves now?"
    )
    return problem, f"{eq1} {eq2}", now


def earn_and_spend(rng, max_n):
    """three steps: hourly pay, then two purchases."""
    name = rng.choice(NAMES)
    wage, hours = rng.randint(3, 12), rng.randint(2, 8)
    pay, eq1 = _op(wage, "*", hours)
    lunch = rng.randint(1, pay - 2)  # pay >= 6, so something is left for the ticket
    mid, eq2 = _op(pay, "-", lunch)
    ticket = rng.randint(1, mid - 1)
    left, eq3 = _op(mid, "-", ticket)
    problem = (
        f"{name} earns {wage} dollars an hour and works for {hours} hours. {name} spends {lunch} dollars on lunch "
        f"and {ticket} dollars on a ticket. How many dollars does {name} have left?"
    )
    return problem, f"{name} earns {eq1} {eq2} {eq3}", left


def packs_collection(rng, max_n):
    """three steps: a collection grows by packs, then some are given away."""
    name, other, obj = rng.choice(NAMES), rng.choice(NAMES), rng.choice(OBJECTS)
    while other == name:
        other = rng.choice(NAMES)
    a, packs, per = rng.randint(2, max_n), rng.randint(2, 6), rng.randint(2, 10)
    bought, eq1 = _op(packs, "*", per)
    total, eq2 = _op(a, "+", bought)
    given = rng.randint(1, total - 1)
    left, eq3 = _op(total, "-", given)
    problem = (
        f"{name} has {a} {obj}. {name} buys {packs} packs with {per} {obj} in each, then gives {given} {obj} to "
        f"{other}. How many {obj} does {name} have now?"
    )
    return problem, f"{eq1} {eq2} {eq3}", left


def picked_in_all(rng, max_n):
    """one step: two amounts added."""
    name, obj = rng.choice(NAMES), rng.choice(["apples", "strawberries", "flowers", "shells", "cherries"])
    a, b = rng.randint(2, max_n), rng.randint(2, max_n)
    total, eq = _op(a, "+", b)
    problem = f"{name} picked {a} {obj} in the morning and {b} in the afternoon. How many {obj} did {name} pick in all?"
    return problem, eq, total


def price_difference(rng, max_n):
    """one step: how much more one thing costs than another."""
    good, other = rng.sample(GOODS, 2)
    b = rng.randint(2, max_n)
    a = b + rng.randint(1, max_n)
    diff, eq = _op(a, "-", b)
    problem = f"A {good} costs {a} dollars and a {other} costs {b} dollars. How many more dollars does the {good} cost?"
    return problem, eq, diff


def album_pages(rng, max_n):
    """one step: exact division into pages."""
    name, obj = rng.choice(NAMES), rng.choice(["stickers", "stamps", "cards", "photos"])
    pages, per = rng.randint(2, 12), rng.randint(2, 9)
    total = pages * per
    n, eq = _op(total, "/", per)
    return f"{name} puts {total} {obj} into an album, {per} on each page. How many pages does {name} fill?", eq, n


# Structure variants (issue 18, second broadening): each story above came with one fixed number of steps, so the SFT
# model read the structure off the story, not off the problem (out of distribution it answered every three-step baker
# problem with too few steps, and after PPO appended a spurious step to one-step ones). Here the same stories come
# with fewer or more steps, so how many steps a problem takes must be read from the quantities it states.
def give_away(rng, max_n):
    """one step: buy_and_give without the buying."""
    name, other, obj = rng.choice(NAMES), rng.choice(NAMES), rng.choice(OBJECTS)
    while other == name:
        other = rng.choice(NAMES)
    a = rng.randint(3, max_n)
    c = rng.randint(1, a - 1)
    left, eq = _op(a, "-", c)
    return f"{name} has {a} {obj} and gives {c} to {other}. How many {obj} does {name} have now?", eq, left


def sell_once(rng, max_n):
    """one step: sell_twice with one sale."""
    obj = rng.choice(OBJECTS)
    a = rng.randint(5, max_n + 20)
    b = rng.randint(1, a - 1)
    left, eq = _op(a, "-", b)
    problem = f"A shop has {a} {obj}. It sells {b} in the morning. How many {obj} are left?"
    return problem, f"The shop starts with {a} {obj}. {eq}", left


def sell_three_times(rng, max_n):
    """three steps: sell_twice with an evening sale."""
    obj = rng.choice(OBJECTS)
    a = rng.randint(10, max_n + 30)
    b = rng.randint(1, a // 3)
    c = rng.randint(1, a // 3)
    d = rng.randint(1, a - b - c)
    mid, eq1 = _op(a, "-", b)
    mid2, eq2 = _op(mid, "-", c)
    left, eq3 = _op(mid2, "-", d)
    problem = (
        f"A shop has {a} {obj}. It sells {b} in the morning, {c} in the afternoon and {d} in the evening. "
        f"How many {obj} are left?"
    )
    return problem, f"The shop starts with {a} {obj}. {eq1} {eq2} {eq3}", left


def library_lends(rng, max_n):
    """one step: library_books without the returns."""
    a = rng.randint(20, max_n + 40)
    out = rng.randint(1, a - 1)
    now, eq = _op(a, "-", out)
    problem = (
        f"A library has {a} books on its shelves. On Monday it lends out {out} books. "
        "How many books are on the shelves now?"
    )
    return problem, eq, now


def picked_three_times(rng, max_n):
    """two steps: picked_in_all with an evening."""
    name, obj = rng.choice(NAMES), rng.choice(["apples", "strawberries", "flowers", "shells", "cherries"])
    a, b, c = rng.randint(2, max_n), rng.randint(2, max_n), rng.randint(2, max_n)
    mid, eq1 = _op(a, "+", b)
    total, eq2 = _op(mid, "+", c)
    problem = (
        f"{name} picked {a} {obj} in the morning, {b} in the afternoon and {c} in the evening. "
        f"How many {obj} did {name} pick in all?"
    )
    return problem, f"{eq1} {eq2}", total


def earn_only(rng, max_n):
    """one step: earn_and_spend without the spending."""
    name = rng.choice(NAMES)
    wage, hours = rng.randint(3, 12), rng.randint(2, 8)
    pay, eq = _op(wage, "*", hours)
    problem = f"{name} earns {wage} dollars an hour and works for {hours} hours. How many dollars does {name} earn?"
    return problem, f"{name} earns {eq}", pay


def earn_and_spend_once(rng, max_n):
    """two steps: earn_and_spend with one purchase."""
    name = rng.choice(NAMES)
    wage, hours = rng.randint(3, 12), rng.randint(2, 8)
    pay, eq1 = _op(wage, "*", hours)
    lunch = rng.randint(1, pay - 1)
    left, eq2 = _op(pay, "-", lunch)
    problem = (
        f"{name} earns {wage} dollars an hour and works for {hours} hours. {name} spends {lunch} dollars on lunch. "
        f"How many dollars does {name} have left?"
    )
    return problem, f"{name} earns {eq1} {eq2}", left


def packs_bought(rng, max_n):
    """two steps: packs_collection without the giving."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    a, packs, per = rng.randint(2, max_n), rng.randint(2, 6), rng.randint(2, 10)
    bought, eq1 = _op(packs, "*", per)
    total, eq2 = _op(a, "+", bought)
    problem = (
        f"{name} has {a} {obj}. {name} buys {packs} packs with {per} {obj} in each. "
        f"How many {obj} does {name} have now?"
    )
    return problem, f"{eq1} {eq2}", total


TEMPLATES = [
    buy_and_give,
    sell_twice,
    buy_items,
    share_equally,
    containers,
    compare_together,
    library_books,
    earn_and_spend,
    packs_collection,
    picked_in_all,
    price_difference,
    album_pages,
    give_away,
    sell_once,
    sell_three_times,
    library_lends,
    picked_three_times,
    earn_only,
    earn_and_spend_once,
    packs_bought,
]
TRAIN_PREAMBLES = ["Solve this word problem.", "Here is a math question.", "Please help me with this problem."]
TRAIN_INSTRUCTIONS = [
    "Think step by step.",
    "Write each calculation as an equation.",
    "Finish with the answer as a whole number.",
    "Explain your reasoning briefly.",
]


def record(problem, steps, answer):
    """One conversational record: the problem, its worked solution ending in "#### <answer>", and the answer."""
    return {
        "messages": [{"role": "user", "content": problem}, {"role": "assistant", "content": f"{steps}\n#### {answer}"}],
        "answer": str(answer),
    }


def make_record(rng, max_n):
    """One record from a uniformly chosen template; a third get a preamble, a third an answer-format instruction."""
    problem, steps, answer = rng.choice(TEMPLATES)(rng, max_n)
    if rng.random() < 1 / 3:
        problem = rng.choice(TRAIN_PREAMBLES) + " " + problem
    if rng.random() < 1 / 3:
        problem += " " + rng.choice(TRAIN_INSTRUCTIONS)
    return record(problem, steps, answer)


def draw_unique(make, n, seen, what="unique problems"):
    """n records from make() whose problem text is not in `seen` (which grows); bounded, so a too-small number space
    fails loudly instead of looping."""
    out = []
    for _ in range(1000 * n + 1000):
        if len(out) == n:
            break
        r = make()
        if r["messages"][0]["content"] not in seen:
            seen.add(r["messages"][0]["content"])
            out.append(r)
    if len(out) < n:
        raise ValueError(f"could only make {len(out)} {what}, asked for {n}")
    return out


def generate(seed, n_train, n_test, max_n=50):
    """Return (train, test) lists of records with no problem text shared between or within splits."""
    rng, seen = random.Random(seed), set()
    test = draw_unique(lambda: make_record(rng, max_n), n_test, seen)
    train = draw_unique(lambda: make_record(rng, max_n), n_train, seen)
    return train, test


# ------------------------------------------------------------------ out of distribution (never used in training)
def remaining(rng, max_n):
    """one step, asked differently: a birds, b fly away."""
    things = rng.choice(["birds on a fence", "cars in a car park", "fish in a pond", "people on a bus"])
    a = rng.randint(5, max_n + 20)
    b = rng.randint(1, a - 1)
    left, eq = _op(a, "-", b)
    noun, place = things.split(" ", 1)
    return f"There are {a} {noun} {place}. Then {b} of them leave. How many {noun} remain {place}?", eq, left


def rate_times(rng, max_n):
    """one step: a rate times a count, in a story training never tells."""
    name = rng.choice(NAMES)
    per, days = rng.randint(2, 15), rng.randint(2, 9)
    total, eq = _op(per, "*", days)
    return f"{name} reads {per} pages every day. How many pages has {name} read after {days} days?", eq, total


def baker_three_steps(rng, max_n):
    """three steps: trays of muffins baked, some sold, more baked."""
    trays, per = rng.randint(2, 6), rng.randint(3, 12)
    total, eq1 = _op(trays, "*", per)
    sold = rng.randint(1, total - 1)
    mid, eq2 = _op(total, "-", sold)
    more = rng.randint(1, max_n // 2)
    final, eq3 = _op(mid, "+", more)
    problem = (
        f"A baker makes {trays} trays of {per} muffins. She sells {sold} muffins before noon and bakes {more} "
        "more in the afternoon. How many muffins does she have at the end of the day?"
    )
    return problem, f"{eq1} {eq2} {eq3}", final


def savings_three_steps(rng, max_n):
    """three steps: weekly savings, a gift, then a purchase."""
    name = rng.choice(NAMES)
    per, weeks, gift = rng.randint(2, 10), rng.randint(2, 8), rng.randint(1, 20)
    saved, eq1 = _op(per, "*", weeks)
    total, eq2 = _op(saved, "+", gift)
    spent = rng.randint(1, total - 1)
    left, eq3 = _op(total, "-", spent)
    problem = (
        f"{name} saves {per} dollars a week for {weeks} weeks, then gets {gift} dollars as a gift. "
        f"{name} spends {spent} dollars on a game. How many dollars are left?"
    )
    return problem, f"{eq1} {eq2} {eq3}", left


def split_groups(rng, max_n):
    """two steps: a class splits into teams after some children leave."""
    teams, size = rng.randint(2, 8), rng.randint(2, 9)
    gone = rng.randint(1, 9)
    start = teams * size + gone
    left, eq1 = _op(start, "-", gone)
    each, eq2 = _op(left, "/", teams)
    problem = (
        f"A class has {start} children. {gone} go home early, and the rest form {teams} teams of equal size. "
        "How many children are in each team?"
    )
    return problem, f"{eq1} {eq2}", each


OOD_TEMPLATES = [remaining, rate_times, baker_three_steps, savings_three_steps, split_groups]
OOD_INSTRUCTIONS = [
    "Answer with just the number.",
    "Show your work, then write the final answer on its own line.",
    "Give the final answer after the word 'Answer:'.",
]


def make_ood_record(rng, max_n):
    """One out-of-distribution record: an OOD template, and for half of them an answer-format instruction."""
    problem, steps, answer = rng.choice(OOD_TEMPLATES)(rng, max_n)
    if rng.random() < 0.5:
        problem += " " + rng.choice(OOD_INSTRUCTIONS)
    return record(problem, steps, answer)


def generate_ood(seed, n, max_n=50):
    """n unique out-of-distribution records from their own random stream (train and test stay as they were)."""
    rng = random.Random(f"ood-{seed}")
    return draw_unique(lambda: make_ood_record(rng, max_n), n, set(), "unique out-of-distribution problems")


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-ood", type=int, default=200)
    parser.add_argument("--max-n", type=int, default=50, help="largest starting quantity in +/- templates")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "arith"))
    args = parser.parse_args(argv)
    train, test = generate(args.seed, args.n_train, args.n_test, args.max_n)
    os.makedirs(args.out, exist_ok=True)
    write_jsonl(os.path.join(args.out, "train.jsonl"), train)
    write_jsonl(os.path.join(args.out, "test.jsonl"), test)
    ood = generate_ood(args.seed, args.n_ood, args.max_n)
    write_jsonl(os.path.join(args.out, "ood.jsonl"), ood)
    print(f"wrote {len(train)} train, {len(test)} test and {len(ood)} out-of-distribution records to {args.out}")


if __name__ == "__main__":
    main()
