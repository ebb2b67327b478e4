"""Synthesised chat and JSON-output training prompts (mt-bench-like variety, deterministic).

Chat prompts are task templates (writing, explaining, advising, comparing, role-play, rewriting,
reasoning, planning) crossed with topics, audiences and lengths; JSON prompts ask for records of
many entity kinds in several phrasings. The result is shuffled with a seed, deduplicated (case
and whitespace insensitive) and never contains a prompt of the evaluation sets given with
``--exclude`` (exact first turns, normalised).

``python -m dspark_sglang.training.synth_prompts --out chat_json_synth.jsonl --chat 1200
--json 300 --exclude ../shared/workloads/eval/mt-bench.jsonl``
"""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Sequence
from pathlib import Path

from dspark_sglang.utils.jsonl import read_jsonl

TOPICS = (
    "photosynthesis", "the water cycle", "black holes", "the French Revolution", "jazz music",
    "machine learning", "climate change", "the human brain", "volcanoes", "the stock market",
    "electric cars", "the Roman Empire", "honeybees", "quantum computing", "meditation",
    "the printing press", "vaccines", "renewable energy", "the Great Wall of China", "coffee",
    "the Internet", "ancient Egypt", "plate tectonics", "sleep", "the Moon landing",
    "recycling", "chess", "the Olympic Games", "social media", "space exploration",
    "the Renaissance", "DNA", "inflation", "public libraries", "urban gardening",
    "remote work", "the Amazon rainforest", "artificial intelligence ethics", "marathon training",
    "classical music", "cryptocurrency", "the immune system", "ocean tides", "video games",
    "minimalism", "the Industrial Revolution", "volunteering", "time management", "bread baking",
    "learning a second language", "the solar system", "electric guitars", "nuclear power",
    "the history of cinema", "bird migration", "self-driving cars", "public speaking",
    "the Silk Road", "coral reefs", "3D printing", "personal budgeting", "the Cold War",
    "yoga", "dinosaurs", "wind turbines", "smartphones", "the Mediterranean diet",
    "hiking safety", "the Eiffel Tower", "climate-friendly travel", "board games",
    "the scientific method", "antibiotics", "democracy", "street food", "the Arctic",
    "open source software", "composting", "photography", "the history of money",
    "electric bicycles", "mountain climbing", "rainbows", "earthquakes", "tea ceremonies",
    "the human heart", "online privacy", "carbon capture", "gardening for beginners",
    "the Beatles", "job interviews", "first aid", "museums", "the Milky Way", "glaciers",
    "kindness", "procrastination", "team sports", "water conservation", "the Wright brothers",
)

AUDIENCES = ("a 10-year-old", "a busy professional", "a high school student", "a beginner",
             "my grandmother", "a university student", "a tourist", "a small business owner")

PLACES = ("Hawaii", "Kyoto", "Iceland", "Paris", "Cape Town", "Peru", "New Zealand",
          "Morocco", "Norway", "Vietnam", "Rome", "Istanbul", "Scotland", "Costa Rica",
          "Barcelona", "Bali", "Yellowstone", "Prague", "Mexico City", "Singapore")

ROLES = ("a pirate captain", "a medieval knight", "a tour guide", "a detective",
         "a friendly robot", "a chef", "a sports coach", "a museum curator", "a park ranger",
         "a science teacher", "an astronaut", "a travel agent", "a librarian", "a gardener")

CHAT_TEMPLATES = (
    "Explain {topic} in simple terms.",
    "Explain {topic} to {audience}.",
    "Write a short blog post about {topic}.",
    "Write a persuasive paragraph about why people should learn about {topic}.",
    "What are the pros and cons of {topic}?",
    "Give me five interesting facts about {topic}.",
    "Write a short poem about {topic}.",
    "Write a haiku about {topic}, then explain the imagery you used.",
    "Summarize the history of {topic} in a few paragraphs.",
    "What are common misconceptions about {topic}?",
    "Write a short story that involves {topic}.",
    "Create a study guide about {topic} for {audience}.",
    "Describe how {topic} affects everyday life.",
    "Compare {topic} and {topic2}: how are they similar and how are they different?",
    "Write a dialogue between two friends discussing {topic}.",
    "Pretend you are {role}. Explain {topic} in character.",
    "Draft an email to a colleague proposing a workshop about {topic}.",
    "Write a product description for a book about {topic}.",
    "Give me a step-by-step plan to learn about {topic} in one month.",
    "What questions would you ask an expert on {topic}? List ten and explain why.",
    "Write a speech for a school assembly about {topic}.",
    "Write a travel blog post about a trip to {place}, highlighting culture and food.",
    "Plan a three-day itinerary for {place}.",
    "Pretend you are {role} and describe your typical day.",
    "Write a formal letter to a city council about improving {topic} in our town.",
    "Give advice to {audience} who wants to get started with {topic}.",
    "List the main arguments for and against investing public money in {topic}.",
    "Write a news article announcing a breakthrough related to {topic}.",
    "Rewrite this sentence in a more formal style and explain the changes: "
    "\"{topic} is kinda cool and everyone should check it out.\"",
    "Write a limerick about {topic}.",
    "Imagine {topic} did not exist. How would the world be different?",
    "Write a short motivational message for {audience} who is struggling with {topic}.",
    "Outline an essay about {topic} with an introduction, three body paragraphs and a "
    "conclusion.",
    "What are the ethical questions raised by {topic}?",
    "Describe {topic} using only simple words, then describe it again as a scientist would.",
    "Write a FAQ with five questions and answers about {topic}.",
    "Write a short review of an imaginary documentary about {topic}.",
    "Create a quiz with five multiple-choice questions about {topic}, with answers.",
    "Give me a brief summary of {topic} for {audience}.",
    "Write a social media post promoting an event about {topic}.",
)

ENTITIES = (
    ("person", "name, age, city and occupation"),
    ("book", "title, author, year and genre"),
    ("movie", "title, director, year, genre and rating"),
    ("product", "name, price, category and in_stock"),
    ("car", "make, model, year and color"),
    ("restaurant", "name, cuisine, city, rating and price_range"),
    ("employee", "id, name, department, salary and start_date"),
    ("event", "title, date, location and attendees (a list of names)"),
    ("recipe", "name, servings, ingredients (a list) and steps (a list)"),
    ("song", "title, artist, album, year and duration_seconds"),
    ("city", "name, country, population and landmarks (a list)"),
    ("student", "name, grade, subjects (a list) and gpa"),
    ("flight", "flight_number, origin, destination, departure and arrival"),
    ("hotel", "name, city, stars, price_per_night and amenities (a list)"),
    ("planet", "name, diameter_km, moons and has_rings"),
    ("company", "name, industry, founded, employees and headquarters"),
    ("user profile", "username, email, age, interests (a list) and verified"),
    ("weather report", "city, date, temperature_c, conditions and humidity"),
    ("order", "order_id, customer, items (a list of objects with name and quantity) and total"),
    ("course", "code, title, credits, instructor and prerequisites (a list)"),
    ("pet", "name, species, breed, age and vaccinated"),
    ("task", "id, title, priority, due_date and done"),
    ("invoice", "number, date, customer, line_items (a list) and amount_due"),
    ("museum exhibit", "title, artist, year, medium and room"),
)

JSON_TEMPLATES = (
    "Generate a JSON object describing a fictional {entity} with the fields {fields}. "
    "Output only JSON.",
    "Create a JSON object for a {entity} with {fields}. Respond with valid JSON and nothing else.",
    "Return a JSON array of three fictional {entity}s, each with {fields}. Output only JSON.",
    "Return a JSON array of two fictional {entity}s, each with {fields}. Output only JSON.",
    "Describe a {entity} related to {topic} as a JSON object with {fields}. Output only JSON.",
    "Give me a JSON object with the fields {fields} for an imaginary {entity}. "
    "No explanation, only the JSON.",
)


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def synth_chat(rng: random.Random) -> list[str]:
    """Every chat prompt the templates can make (slots filled from ``rng``)."""
    out = []
    for tpl, topic in itertools.product(CHAT_TEMPLATES, TOPICS):
        topic2 = rng.choice([t for t in TOPICS if t != topic])
        out.append(tpl.format(topic=topic, topic2=topic2, audience=rng.choice(AUDIENCES),
                              place=rng.choice(PLACES), role=rng.choice(ROLES)))
    return out


def synth_json(rng: random.Random) -> list[str]:
    out = []
    for tpl, (entity, fields) in itertools.product(JSON_TEMPLATES, ENTITIES):
        for _ in range(3):
            out.append(tpl.format(entity=entity, fields=fields, topic=rng.choice(TOPICS)))
    return out


def synthesize(num_chat: int, num_json: int, exclude: Sequence[str] = (), seed: int = 0
               ) -> list[dict[str, object]]:
    """``num_chat`` chat + ``num_json`` JSON prompts as ``{"domain", "turns"}`` rows, unique and
    disjoint from ``exclude`` (normalised text)."""
    rng = random.Random(seed)
    banned = {_norm(x) for x in exclude}
    rows: list[dict[str, object]] = []
    for domain, pool, n in (("chat", synth_chat(rng), num_chat),
                            ("json", synth_json(rng), num_json)):
        rng.shuffle(pool)
        seen: set[str] = set()
        picked = []
        for text in pool:
            key = _norm(text)
            if key in banned or key in seen:
                continue
            seen.add(key)
            picked.append({"domain": domain, "turns": [text]})
            if len(picked) == n:
                break
        if len(picked) < n:
            raise ValueError(f"only {len(picked)} distinct {domain} prompts can be made, "
                             f"{n} asked")
        rows += picked
    rng.shuffle(rows)
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="synthesise chat / JSON training prompts")
    ap.add_argument("--out", required=True)
    ap.add_argument("--chat", type=int, default=1200)
    ap.add_argument("--json", type=int, default=150)
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="jsonl prompt files whose first turns must not appear")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    exclude = []
    for path in args.exclude:
        for row in read_jsonl(path):
            turns = row.get("turns") or [row.get("prompt", "")]
            exclude += [str(t) for t in turns]
    rows = synthesize(args.chat, args.json, exclude, args.seed)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
    main()
