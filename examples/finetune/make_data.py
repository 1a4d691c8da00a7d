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


if __name__ == "__main__":
    main()
