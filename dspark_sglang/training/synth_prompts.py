"""Synthesised chat and JSON-output training prompts (mt-bench-like variety, deterministic).

Chat prompts are task templates (writing, explaining, advising, comparing, role-play, rewriting,
reasoning, planning) crossed with topics, audiences and lengths; JSON prompts ask for records of
many entity kinds in several phrasings. The result is shuffled with a seed, deduplicated (case
and whitespace insensitive) and never contains a prompt of the evaluation sets given with
``--exclude`` (exact first turns, normalised).

``python -m dspark_sglang.training.synth_prompts --out chat_json_synth.jsonl --chat 1200
--json 300 --exclude ../shared/workloads/eval/mt-bench.jsonl``

Code prompts are MBPP-style one-line tasks in several phrasings plus HumanEval-style stubs
(signature + docstring) of documented pure-Python standard-library functions; math prompts are
numeric variants of word-problem and short exercise templates, with the suffix the math prompt
files use.
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

CODE_TASKS = (
    # strings
    "reverse a string", "check whether a string is a palindrome", "count the vowels in a string",
    "count the number of words in a sentence", "remove all whitespace from a string",
    "capitalize the first letter of each word in a string", "find the longest word in a sentence",
    "check whether two strings are anagrams of each other",
    "remove duplicate characters from a string while keeping their order",
    "find the first non-repeated character in a string",
    "count the occurrences of each character in a string",
    "replace all spaces in a string with underscores",
    "convert a string from snake case to camel case", "convert a camel case string to snake case",
    "check whether a string contains only digits", "find the most frequent character in a string",
    "compress a string using run-length encoding", "decode a run-length encoded string",
    "check whether a string is a valid IPv4 address", "extract all numbers from a string",
    "check whether the parentheses in a string are balanced",
    "find all palindromic substrings of a string",
    "toggle the case of every character in a string", "remove all punctuation from a string",
    "count the uppercase and lowercase letters in a string",
    "find the longest common prefix of a list of strings",
    "sort the words of a sentence alphabetically", "reverse the order of words in a sentence",
    "check whether a string is a pangram", "encrypt a string with a Caesar cipher of a given shift",
    "find the index of the first occurrence of a substring without using str.find",
    "truncate a string to a given length and add an ellipsis",
    "count the overlapping occurrences of a substring in a string",
    "check whether a string is a valid email address using a regular expression",
    "split a string into chunks of a given size", "remove the nth character from a string",
    "interleave two strings character by character",
    "find the length of the longest substring without repeating characters",
    "check whether one string is a rotation of another",
    "count the number of consonants in a string", "check whether a string is a valid identifier",
    "convert a string to title case without using str.title",
    "find the shortest word in a list of words", "remove all vowels from a string",
    # lists
    "find the second largest number in a list",
    "remove duplicates from a list while preserving order", "flatten a nested list",
    "find the sum of all even numbers in a list", "find the product of all elements in a list",
    "rotate a list to the right by k positions", "find the intersection of two lists",
    "find the union of two lists without duplicates",
    "merge two sorted lists into one sorted list", "split a list into chunks of size n",
    "find the kth smallest element in a list",
    "count the elements of a list that are greater than a given value",
    "compute the running sum of a list of numbers",
    "check whether a list is sorted in non-decreasing order",
    "find the missing number in a list containing the numbers from 1 to n",
    "move all zeros in a list to the end while keeping the order of the other elements",
    "find all pairs in a list whose sum equals a given target",
    "find the maximum sum of a contiguous sublist",
    "find the element that appears most often in a list",
    "group a list of words by their first letter",
    "remove all occurrences of a given value from a list",
    "find the difference between the largest and smallest values in a list",
    "compute the average of a list of numbers", "find the median of a list of numbers",
    "find the mode of a list of numbers", "interleave two lists",
    "find the index of the largest element in a list",
    "check whether a list contains any duplicates", "zip two lists into a dictionary",
    "find the length of the longest increasing subsequence of a list",
    "sort a list of tuples by their second element",
    "sort a list of dictionaries by a given key", "compute the cumulative product of a list",
    "swap the first and last elements of a list", "find the common elements of three lists",
    "return every nth element of a list",
    "find the length of the longest run of equal consecutive elements in a list",
    "partition a list into even and odd numbers",
    "search a sorted list for a value with binary search", "sort a list with bubble sort",
    "sort a list with insertion sort", "sort a list with merge sort", "sort a list with quicksort",
    "sort a list with selection sort", "count the inversions in a list",
    "find the smallest positive integer that does not appear in a list",
    "find the sum of the squares of the odd numbers in a list",
    "check whether two lists have the same elements in any order",
    "remove the negative numbers from a list", "find the cumulative maximum of a list",
    # numbers
    "check whether a number is prime",
    "find all prime numbers up to n using the sieve of Eratosthenes",
    "compute the factorial of a number", "compute the nth Fibonacci number",
    "compute the greatest common divisor of two numbers",
    "compute the least common multiple of two numbers",
    "check whether a number is a perfect square", "check whether a number is a perfect number",
    "check whether a number is an Armstrong number", "find the sum of the digits of a number",
    "reverse the digits of an integer", "convert a decimal number to binary",
    "convert a binary string to a decimal number", "convert an integer to a Roman numeral",
    "convert a Roman numeral to an integer", "count the set bits in an integer",
    "check whether a number is a power of two", "find all divisors of a number",
    "find the prime factors of a number", "compute the sum of the first n natural numbers",
    "compute the sum of the squares of the first n natural numbers",
    "check whether a year is a leap year", "convert a temperature from Celsius to Fahrenheit",
    "compute the nth triangular number", "count the trailing zeros of n factorial",
    "check whether a number is a palindrome",
    "compute x to the power n without using the ** operator",
    "compute the binomial coefficient n choose k", "compute the nth Catalan number",
    "compute the digital root of a number", "count the digits of an integer",
    "check whether three lengths can form a triangle",
    "compute the area of a circle given its radius",
    "compute the hypotenuse of a right triangle from its two legs",
    "compute the distance between two points in the plane",
    "find the sum of all multiples of 3 or 5 below n",
    "compute the nth term of an arithmetic progression",
    "compute the sum of a geometric series", "round a number to the nearest multiple of 5",
    "count the ways to climb n stairs taking 1 or 2 steps at a time",
    "compute compound interest given the principal, rate and years",
    "convert a number of seconds into hours, minutes and seconds",
    "check whether a number is even or odd without using the modulo operator",
    "find the largest of three numbers", "compute the volume of a cylinder",
    # dicts, matrices, algorithms, misc
    "merge two dictionaries", "invert a dictionary by swapping its keys and values",
    "count the word frequencies of a text and return a dictionary",
    "find the key with the largest value in a dictionary", "sort a dictionary by its values",
    "remove the keys with empty values from a dictionary", "find the depth of a nested dictionary",
    "group a list of pairs into a dictionary of lists keyed by the first element",
    "check whether all values in a dictionary are equal", "compute the transpose of a matrix",
    "multiply two matrices", "compute the sum of the main diagonal of a square matrix",
    "rotate a square matrix by 90 degrees clockwise", "check whether a matrix is symmetric",
    "find the row with the largest sum in a matrix",
    "return the elements of a matrix in spiral order",
    "generate the first n rows of Pascal's triangle", "generate all permutations of a list",
    "generate all subsets of a set", "find all combinations of k elements of a list",
    "count the islands in a grid of 0s and 1s", "compute the edit distance between two strings",
    "find the longest common subsequence of two strings", "solve the 0/1 knapsack problem",
    "find the minimum number of coins that make a given amount",
    "implement a stack class with push, pop and peek", "implement a queue using two stacks",
    "check whether a binary tree is balanced", "compute the height of a binary tree",
    "do a breadth-first search of a graph given as an adjacency list",
    "do a depth-first search of a graph given as an adjacency list",
    "detect a cycle in a directed graph",
    "find the shortest path between two nodes of an unweighted graph",
    "compute the number of days between two dates",
    "check that a password has at least 8 characters, one digit and one uppercase letter",
    "parse a line of comma-separated values into a list of fields",
    "count the lines of a text file", "convert a list of digits into a single integer",
    "check whether a tuple contains a given element",
    "count the unique elements of a tuple", "join a tuple of strings into one string",
    "implement a simple LRU cache class", "find the majority element of a list",
    "check whether a linked list has a cycle", "reverse a singly linked list",
)

CODE_TEMPLATES = (
    "Write a python function to {task}.",
    "Write a function to {task}.",
    "Write a Python program to {task}.",
    "Write a Python function to {task}. Include a docstring and a few test cases.",
    "Write a function to {task}. Explain your approach briefly.",
)

HUMANEVAL_HEADER = ("Write a solution to the following problem and make sure that it passes "
                    "the tests:\n```python\n{code}\n```")

STDLIB_MODULES = (
    "string", "textwrap", "statistics", "bisect", "heapq", "fnmatch", "posixpath", "ntpath",
    "html", "colorsys", "calendar", "difflib", "shlex", "base64", "urllib.parse", "glob",
    "email.utils", "ipaddress", "copy", "pprint", "re", "json", "csv", "gettext", "locale",
    "tokenize", "random", "functools", "inspect", "dis", "codecs", "quopri", "zipfile",
    "tarfile", "shutil", "tempfile", "mimetypes", "platform", "sysconfig", "uuid", "filecmp",
    "fractions", "decimal", "datetime", "operator", "keyword", "linecache", "reprlib",
    "traceback", "warnings", "contextlib", "dataclasses", "enum", "typing", "ast",
)


def synth_code(rng: random.Random) -> list[str]:
    """MBPP-style one-line tasks (``CODE_TASKS`` x phrasings) and HumanEval-style stubs made
    from documented pure-Python functions of the standard library (signature + docstring)."""
    out = [tpl.format(task=task) for tpl, task in itertools.product(CODE_TEMPLATES, CODE_TASKS)]
    return out + stdlib_stubs()


def stdlib_stubs(max_doc_lines: int = 14) -> list[str]:
    import importlib
    import inspect

    out = []
    for mod_name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name, fn in sorted(vars(mod).items()):
            if (name.startswith("_") or not inspect.isfunction(fn)
                    or fn.__module__ != mod.__name__):
                continue
            doc = inspect.getdoc(fn) or ""
            try:
                sig = str(inspect.signature(fn))
            except (TypeError, ValueError):
                continue
            if len(doc) < 40 or "<" in sig or len(sig) > 100:
                continue
            lines = doc.splitlines()[:max_doc_lines]
            body = "\n".join(("    " + ln).rstrip() for ln in lines)
            code = f'def {name}{sig}:\n    """\n{body}\n    """\n'
            out.append(HUMANEVAL_HEADER.format(code=code))
    return out


NAMES = ("Maria", "James", "Aisha", "Tom", "Lena", "Carlos", "Priya", "Ben", "Sofia", "Omar",
         "Emma", "Kenji", "Nora", "Luis", "Grace", "Ivan", "Zoe", "Samir", "Hannah", "Leo")

MATH_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."

# Word problems (GSM-like) and short competition-style exercises; {a}..{d} are small integers,
# {n} a name, {m} another name.
MATH_TEMPLATES = (
    "{n} has {a} apples. {n} buys {b} bags with {c} apples in each bag and gives {d} apples to "
    "{m}. How many apples does {n} have now?",
    "A bakery sells muffins for ${c} each. On Monday it sold {a} muffins and on Tuesday {b} more "
    "than on Monday. How much money did the bakery make on the two days?",
    "{n} reads {a} pages every weekday and {b} pages on each day of the weekend. How many pages "
    "does {n} read in {c} weeks?",
    "A train travels at {a} miles per hour for {b} hours and then at {c} miles per hour for {d} "
    "hours. What is the total distance it travels?",
    "{n} earns ${a} per hour and works {b} hours a week. After {c} weeks, {n} spends ${d} on a "
    "bike. How much money does {n} have left?",
    "A class has {a} students. {b} of them are girls. If {c} boys and {d} girls are absent today, "
    "how many students are present?",
    "{n} is {a} years old. {m} is {b} years older than {n}. In {c} years, what will be the sum of "
    "their ages?",
    "A garden is {a} meters long and {b} meters wide. A path {c} meter wide is built around the "
    "outside of it. What is the area of the path?",
    "{n} buys {a} notebooks at ${b} each and {c} pens at ${d} each. {n} pays with a $200 bill. "
    "How much change does {n} get?",
    "A tank holds {a}0 liters of water. It leaks {b} liters per hour and is refilled with {c} "
    "liters every {d} hours. How much water is in the tank after {d} hours if it starts full?",
    "{n} ran {a} kilometers on Monday, twice as far on Tuesday and {b} kilometers less than "
    "Tuesday on Wednesday. How far did {n} run in the three days?",
    "A store offers a {a}% discount on a jacket that costs ${b}0. Sales tax of {c}% is added to "
    "the discounted price. What is the final price?",
    "There are {a} red marbles, {b} blue marbles and {c} green marbles in a jar. What fraction "
    "of the marbles are not blue?",
    "{n} saves ${a} in the first week and ${b} more each week than the week before. How much has "
    "{n} saved after {c} weeks?",
    "A recipe needs {a} cups of flour for {b} cookies. How many cups of flour are needed for "
    "{c}0 cookies?",
    "{n} and {m} share ${a}00 in the ratio {b}:{c}. How much more does the one with the larger "
    "share get?",
    "A farmer has {a} cows and {b} chickens. How many legs do the animals have in total?",
    "A car uses {a} liters of fuel per 100 kilometers. Fuel costs ${b} per liter. How much does "
    "a trip of {c}00 kilometers cost?",
    "{n} plants {a} rows of tomatoes with {b} plants in each row. Each plant gives {c} tomatoes. "
    "{n} sells them in boxes of {d}. How many full boxes can {n} fill?",
    "A movie starts at 7:{a}5 pm and lasts {b} hours and {c}0 minutes. At what time does it end?",
    "Find the remainder when {a}{b}{c} is divided by {d}.",
    "Solve for $x$: ${a}x + {b} = {c}x - {d}$.",
    "What is the greatest common divisor of {a}{b} and {c}{d}?",
    "What is the least common multiple of {a}, {b} and {c}?",
    "Compute $\\binom{{{a}{b}}}{{{c}}}$.",
    "How many positive divisors does {a}{b}{c} have?",
    "What is the sum of all positive integers less than {a}{b} that are divisible by {c}?",
    "Simplify $\\frac{{{a}{b}}}{{{c}{d}}}$.",
    "Evaluate ${a}^3 - {b}^2 + {c} \\cdot {d}$.",
    "The sum of two numbers is {a}{b} and their difference is {c}. What is the larger number?",
    "A rectangle has perimeter {a}{b} and one side of length {c}. What is its area?",
    "What is the area of a triangle with vertices $(0,0)$, $({a},0)$ and $({b},{c})$?",
    "Find the value of $x$ such that $\\sqrt{{x + {a}}} = {b}$.",
    "If $f(x) = {a}x^2 - {b}x + {c}$, what is $f({d})$?",
    "What is the sum of the first {a}{b} positive odd integers?",
    "How many ways can {a} different books be arranged on a shelf?",
    "A fair die is rolled twice. What is the probability that the sum is {b}? Express your answer "
    "as a common fraction.",
    "What is the units digit of ${a}^{{{b}{c}}}$?",
    "Find the distance between the points $({a},{b})$ and $({c},{d})$.",
    "The arithmetic mean of {a} numbers is {b}{c}. When one number is removed the mean becomes "
    "{b}{d}. What number was removed?",
)


def synth_math(rng: random.Random, per_template: int = 20) -> list[str]:
    """``per_template`` numeric variants of every ``MATH_TEMPLATES`` problem, with the suffix the
    training and evaluation math prompts share."""
    out = []
    for tpl in MATH_TEMPLATES:
        for _ in range(per_template):
            n, m = rng.sample(NAMES, 2)
            vals = {k: rng.randint(2, 9) for k in "abcd"}
            out.append(tpl.format(n=n, m=m, **vals) + MATH_SUFFIX)
    return out


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


def synthesize(num_chat: int, num_json: int, exclude: Sequence[str] = (), seed: int = 0,
               num_code: int = 0, num_math: int = 0) -> list[dict[str, object]]:
    """``num_chat`` chat + ``num_json`` JSON (+ ``num_code`` code + ``num_math`` math) prompts as
    ``{"domain", "turns"}`` rows, unique and disjoint from ``exclude`` (normalised text)."""
    rng = random.Random(seed)
    banned = {_norm(x) for x in exclude}
    rows: list[dict[str, object]] = []
    pools = [("chat", synth_chat(rng), num_chat), ("json", synth_json(rng), num_json)]
    if num_code:
        pools.append(("code", synth_code(rng), num_code))
    if num_math:
        pools.append(("math", synth_math(rng), num_math))
    for domain, pool, n in pools:
        if n <= 0:
            continue
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
    ap.add_argument("--code", type=int, default=0)
    ap.add_argument("--math", type=int, default=0)
    ap.add_argument("--exclude", nargs="*", default=[],
                    help="jsonl prompt files whose first turns must not appear")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    exclude = []
    for path in args.exclude:
        for row in read_jsonl(path):
            turns = row.get("turns") or [row.get("prompt", "")]
            exclude += [str(t) for t in turns]
    rows = synthesize(args.chat, args.json, exclude, args.seed, args.code, args.math)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {args.out}")


if __name__ == "__main__":
    main()
