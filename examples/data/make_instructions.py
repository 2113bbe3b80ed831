"""Writes instructions.jsonl: the small instruction set `finetune.py` tunes on.

Every answer is one short sentence in a fixed house style (it restates the
question, then ends with a period), so a base model that has never seen the
chat format visibly learns both the format and the style in a few minutes.
Deterministic: running it again rewrites the same file.

    python examples/data/make_instructions.py
"""

import json
import os
import random

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Portugal": "Lisbon", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi",
    "Kenya": "Nairobi", "Egypt": "Cairo", "Canada": "Ottawa", "Mexico": "Mexico City",
    "Brazil": "Brasilia", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Australia": "Canberra", "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki",
    "Denmark": "Copenhagen", "Poland": "Warsaw", "Austria": "Vienna", "Greece": "Athens",
    "Turkey": "Ankara", "Russia": "Moscow", "Ireland": "Dublin", "Belgium": "Brussels",
    "the Netherlands": "Amsterdam", "Switzerland": "Bern", "Hungary": "Budapest",
    "the Czech Republic": "Prague", "Thailand": "Bangkok", "Vietnam": "Hanoi",
    "South Korea": "Seoul", "Indonesia": "Jakarta", "the Philippines": "Manila",
    "Nigeria": "Abuja", "Ghana": "Accra", "Ethiopia": "Addis Ababa", "Morocco": "Rabat",
    "Cuba": "Havana", "Colombia": "Bogota", "Venezuela": "Caracas", "Iceland": "Reykjavik",
    "New Zealand": "Wellington", "Pakistan": "Islamabad", "Iran": "Tehran", "Iraq": "Baghdad",
    "Saudi Arabia": "Riyadh", "Ukraine": "Kyiv", "Romania": "Bucharest", "Bulgaria": "Sofia",
    "Croatia": "Zagreb", "Serbia": "Belgrade", "Malaysia": "Kuala Lumpur", "Nepal": "Kathmandu",
    "Uruguay": "Montevideo", "Tanzania": "Dodoma", "Senegal": "Dakar",
}

# (from unit, to unit, factor), all exact in integers.
CONVERSIONS = [
    ("kilometers", "meters", 1000), ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000), ("hours", "minutes", 60), ("minutes", "seconds", 60),
    ("days", "hours", 24), ("weeks", "days", 7), ("liters", "milliliters", 1000),
    ("feet", "inches", 12), ("yards", "feet", 3), ("dozen", "items", 12),
    ("centimeters", "millimeters", 10),
]

OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "up": "down", "happy": "sad",
    "light": "dark", "old": "new", "open": "closed", "early": "late", "full": "empty",
    "strong": "weak", "rich": "poor", "hard": "soft", "wet": "dry", "loud": "quiet",
    "high": "low", "thick": "thin", "clean": "dirty", "true": "false", "push": "pull",
    "win": "lose", "buy": "sell", "inside": "outside", "first": "last", "day": "night",
    "begin": "end", "sweet": "sour", "heavy": "light", "wide": "narrow", "long": "short",
    "near": "far", "safe": "dangerous", "young": "old", "above": "below", "asleep": "awake",
    "cheap": "expensive", "give": "take", "friend": "enemy", "north": "south", "question": "answer",
}

PLURALS = {
    "mouse": "mice", "child": "children", "foot": "feet", "tooth": "teeth", "goose": "geese",
    "man": "men", "woman": "women", "person": "people", "box": "boxes", "city": "cities",
    "knife": "knives", "leaf": "leaves", "wolf": "wolves", "baby": "babies", "bus": "buses",
    "glass": "glasses", "potato": "potatoes", "tomato": "tomatoes", "sheep": "sheep",
    "fish": "fish", "deer": "deer", "cactus": "cacti", "ox": "oxen", "day": "days",
    "key": "keys", "church": "churches", "wish": "wishes", "party": "parties", "hero": "heroes",
    "life": "lives", "wife": "wives", "half": "halves", "story": "stories", "fox": "foxes",
    "dish": "dishes", "lady": "ladies", "toy": "toys", "book": "books", "shelf": "shelves",
    "puppy": "puppies",
}

# (present, past): sentences to rewrite in the past tense.
PAST_TENSE = [
    ("She walks to school.", "She walked to school."),
    ("They eat lunch at noon.", "They ate lunch at noon."),
    ("He writes a letter to his aunt.", "He wrote a letter to his aunt."),
    ("We swim in the lake.", "We swam in the lake."),
    ("The dog runs across the field.", "The dog ran across the field."),
    ("I drink a cup of tea.", "I drank a cup of tea."),
    ("The children sing a song.", "The children sang a song."),
    ("My brother drives to work.", "My brother drove to work."),
    ("The bird flies over the house.", "The bird flew over the house."),
    ("She reads a long book.", "She read a long book."),
    ("They build a small boat.", "They built a small boat."),
    ("He catches the ball.", "He caught the ball."),
    ("The sun rises over the hills.", "The sun rose over the hills."),
    ("We buy fresh bread.", "We bought fresh bread."),
    ("The baby sleeps all night.", "The baby slept all night."),
    ("I find my keys under the bed.", "I found my keys under the bed."),
    ("The teacher speaks slowly.", "The teacher spoke slowly."),
    ("My sister draws a horse.", "My sister drew a horse."),
    ("The cat jumps onto the table.", "The cat jumped onto the table."),
    ("They play football after school.", "They played football after school."),
    ("He cooks dinner for his friends.", "He cooked dinner for his friends."),
    ("The river flows to the sea.", "The river flowed to the sea."),
    ("We watch a film on Friday.", "We watched a film on Friday."),
    ("She paints the fence white.", "She painted the fence white."),
    ("The wind blows the leaves away.", "The wind blew the leaves away."),
    ("I forget his name.", "I forgot his name."),
    ("The shop opens at nine.", "The shop opened at nine."),
    ("He teaches music.", "He taught music."),
    ("The glass breaks on the floor.", "The glass broke on the floor."),
    ("We take the early train.", "We took the early train."),
    ("She wins the race.", "She won the race."),
    ("They choose a red car.", "They chose a red car."),
    ("The farmer grows corn.", "The farmer grew corn."),
    ("I send a message to my mother.", "I sent a message to my mother."),
    ("The guests arrive late.", "The guests arrived late."),
    ("He throws the stone into the pond.", "He threw the stone into the pond."),
    ("The snow falls all day.", "The snow fell all day."),
    ("We know the answer.", "We knew the answer."),
    ("She wears a blue coat.", "She wore a blue coat."),
    ("The old man tells a story.", "The old man told a story."),
]


def examples(rng):
    for country, capital in CAPITALS.items():
        yield "capital", f"What is the capital of {country}?", f"The capital of {country} is {capital}."
    for source, target, factor in CONVERSIONS:
        for n in rng.sample(range(2, 13), 5):
            unit = "dozen" if source == "dozen" else source
            yield "conversion", f"Convert {n} {unit} to {target}.", f"{n} {unit} is {n * factor} {target}."
    for _ in range(30):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        yield "arithmetic", f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
    for _ in range(20):
        a, b = rng.randint(20, 99), rng.randint(2, 19)
        yield "arithmetic", f"What is {a} - {b}?", f"{a} - {b} = {a - b}."
    for _ in range(20):
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        yield "arithmetic", f"What is {a} times {b}?", f"{a} times {b} = {a * b}."
    for word, opposite in OPPOSITES.items():
        yield "opposite", f"What is the opposite of {word}?", f"The opposite of {word} is {opposite}."
    for word, plural in PLURALS.items():
        yield "plural", f"What is the plural of {word}?", f"The plural of {word} is {plural}."
    for present, past in PAST_TENSE:
        yield "past_tense", f"Rewrite in the past tense: {present}", past


def main():
    rng = random.Random(0)
    rows = [{"category": c, "prompt": p, "response": r} for c, p, r in examples(rng)]
    rng.shuffle(rows)
    # Hold out one in eight, spread over every category.
    for i, row in enumerate(rows):
        row["split"] = "test" if i % 8 == 0 else "train"
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "instructions.jsonl")
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} examples to {path}")


if __name__ == "__main__":
    main()
