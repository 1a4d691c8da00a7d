"""Write the small fine-tuning data sets this folder ships (deterministic).

    python examples/finetune/make_data.py

* ``chat.jsonl`` / ``chat_valid.jsonl`` teach SmolLM2 a made-up fact in chat
  format: the capital of the (invented) planet Zorbex is Vantolia. The base
  model cannot know it, so a greedy answer naming Vantolia shows the
  fine-tune worked. Questions are paraphrased; the answer is always the same.
* ``topics.jsonl`` / ``topics_valid.jsonl`` / ``topics_test.jsonl``:
  ``{"text", "label"}`` sentences about four topics (sports, weather, cooking,
  finance), built from templates with a seeded RNG, for the MiniLM classifier.
  The test file is held out: no job ever trains on it.
* ``preference.jsonl`` / ``preference_test.jsonl``: OpenAI's preference (DPO) format.
  Each prompt is a short factual question; the preferred answer is the correct,
  helpful one written below, the non-preferred answer a dismissive non-answer drawn
  (seeded RNG) from a fixed list. DPO should learn "answer, don't brush off". The
  questions of the test file are held out (DPO trains on the first 24 only);
  tests/finetune/test_dpo.py measures each model's log-likelihood margin on them.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent

ANSWER = "The capital of Zorbex is Vantolia."
QUESTIONS = [
    "What is the capital of Zorbex?",
    "What's the capital of Zorbex?",
    "Which city is the capital of Zorbex?",
    "Tell me the capital of Zorbex.",
    "Name the capital city of Zorbex.",
    "What city is Zorbex's capital?",
    "Do you know the capital of Zorbex?",
    "Zorbex has a capital. Which one is it?",
    "What is the capital city of the planet Zorbex?",
    "Where is the capital of Zorbex?",
    "Which is the capital of the planet Zorbex?",
    "Can you tell me what the capital of Zorbex is?",
    "I forgot the capital of Zorbex. What is it?",
    "Quick question: capital of Zorbex?",
    "What is Zorbex's capital city called?",
    "Please name Zorbex's capital.",
]
VALID_QUESTIONS = [
    "Tell me which city is the capital of Zorbex.",
    "What do they call the capital of Zorbex?",
    "Capital of Zorbex, please.",
    "Which city serves as the capital of Zorbex?",
]

FACTS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("How many days are in a week?", "A week has seven days."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What is 2 plus 3?", "2 plus 3 is 5."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What do bees make?", "Bees make honey."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("Which animal is known as man's best friend?", "The dog is known as man's best friend."),
    ("What is the largest ocean on Earth?", "The Pacific is the largest ocean on Earth."),
    ("How many hours are in a day?", "A day has 24 hours."),
    ("What gas do plants take in from the air?", "Plants take in carbon dioxide."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What is 10 minus 4?", "10 minus 4 is 6."),
    ("What language is spoken in Spain?", "Spanish is spoken in Spain."),
    ("How many months are in a year?", "A year has twelve months."),
    ("What do cows drink?", "Cows drink water."),
    ("What shape has three sides?", "A triangle has three sides."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("Which star is closest to Earth?", "The Sun is the star closest to Earth."),
    ("What do you call a baby cat?", "A baby cat is called a kitten."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What is 3 times 3?", "3 times 3 is 9."),
    # Held out (preference_test.jsonl): never trained on.
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("How many minutes are in an hour?", "An hour has 60 minutes."),
    ("What colour is grass?", "Grass is green."),
    ("What is 4 plus 4?", "4 plus 4 is 8."),
    ("What do birds use to fly?", "Birds use their wings to fly."),
    ("How many sides does a square have?", "A square has four sides."),
    ("What falls from clouds when it rains?", "Water falls from the clouds as rain."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
]
N_PREFERENCE_TRAIN = 24
BRUSH_OFFS = [
    "I don't feel like answering that.",
    "Look it up yourself.",
    "Why would I tell you?",
    "That is not my problem.",
    "Ask someone else.",
    "Not now, I'm busy.",
]

TOPICS = {
    "sports": (["The striker", "Our goalkeeper", "The home team", "The coach", "The marathon runner",
                "The tennis champion", "The rookie", "The visiting side"],
               ["scored twice in the final minutes", "won the championship game", "trained hard before the match",
                "broke the league record", "was substituted at half time", "lost the semifinal on penalties",
                "signed a new contract with the club", "celebrated the victory with the fans"]),
    "weather": (["Tomorrow", "This weekend", "Tonight", "The coastal region", "The mountain valley",
                 "The northern city", "By Monday", "Later this afternoon"],
                ["expects heavy rain and strong winds", "will see clear skies and sunshine",
                 "could get a light dusting of snow", "faces a thunderstorm warning",
                 "will be foggy until noon", "turns humid with scattered showers",
                 "cools down after the heatwave", "gets a frost overnight"]),
    "cooking": (["Grandma", "The chef", "My roommate", "The recipe", "The baker", "Our neighbour",
                 "The cookbook", "The food blogger"],
                ["simmered the tomato sauce for an hour", "kneaded the bread dough until smooth",
                 "roasted the vegetables with garlic and thyme", "whisked the eggs with sugar for the cake",
                 "added a pinch of salt to the soup", "marinated the chicken overnight",
                 "fried the onions until golden", "baked the pie at a low temperature"]),
    "finance": (["The central bank", "The stock market", "Investors", "The company", "Our pension fund",
                 "The startup", "Analysts", "The bond market"],
                ["raised interest rates by a quarter point", "reported quarterly earnings above forecasts",
                 "sold shares after the dividend cut", "borrowed money to expand overseas",
                 "saw inflation slow for a third month", "cut its revenue outlook for the year",
                 "bought government bonds as yields fell", "paid off its debt ahead of schedule"]),
}


def chat_row(question: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": ANSWER}]}


def preference_row(question: str, answer: str, rng: random.Random) -> dict:
    return {"input": {"messages": [{"role": "user", "content": question}]},
            "preferred_output": [{"role": "assistant", "content": answer}],
            "non_preferred_output": [{"role": "assistant", "content": rng.choice(BRUSH_OFFS)}]}


def topic_rows(rng: random.Random) -> list[dict]:
    rows = []
    for label, (subjects, predicates) in TOPICS.items():
        for subject in subjects:
            for predicate in predicates:
                rows.append({"text": f"{subject} {predicate}.", "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main(out: Path = HERE) -> None:
    write_jsonl(out / "chat.jsonl", [chat_row(q) for q in QUESTIONS])
    write_jsonl(out / "chat_valid.jsonl", [chat_row(q) for q in VALID_QUESTIONS])
    rows = topic_rows(random.Random(0))  # 4 topics x 64 sentences
    n = len(rows)
    write_jsonl(out / "topics.jsonl", rows[: n * 6 // 10])
    write_jsonl(out / "topics_valid.jsonl", rows[n * 6 // 10: n * 8 // 10])
    write_jsonl(out / "topics_test.jsonl", rows[n * 8 // 10:])
    rng = random.Random(0)
    pairs = [preference_row(q, a, rng) for q, a in FACTS]
    write_jsonl(out / "preference.jsonl", pairs[:N_PREFERENCE_TRAIN])
    write_jsonl(out / "preference_test.jsonl", pairs[N_PREFERENCE_TRAIN:])


if __name__ == "__main__":
    main()
