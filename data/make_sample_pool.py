"""Build ``data/sample_pool.jsonl``: the small, hand-written pool behind the offline demo.

Each topic has one clean, complete answer and a few low-quality variants of the kind a real
instruction pool is full of: casual or vague rewordings, terse answers, typos, half-wrong answers.
Variants of one topic are near-duplicates, so clustering has something real to find. A few rows use
the Alpaca ``instruction/input/output`` layout and a few are deliberately broken to show quarantine.

    python data/make_sample_pool.py            # rewrites data/sample_pool.jsonl (deterministic)

It also writes ``data/sample_pool_topics.json``: for every valid row id, the topic whose variant it
is (-1 for rows that stand alone), the ground truth the clustering is measured against.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

# (source, question, good answer, casual rewording, terse answer, partly wrong answer)
TOPICS: list[tuple[str, str, str, str, str, str]] = [
    # -- dolly: open QA, classification, brainstorming -------------------------------------------
    (
        "dolly",
        "Why do leaves change colour in autumn?",
        "As days shorten and nights cool, trees stop producing chlorophyll, the green pigment used for "
        "photosynthesis. As it breaks down, yellow and orange carotenoids that were present all along become "
        "visible, and some species also make red anthocyanins from sugars trapped in the leaf.",
        "why do leafs turn red and yellow in fall",
        "less sunlight so they lose the green",
        "Leaves change colour because the cold freezes the water in them, which turns them yellow.",
    ),
    (
        "dolly",
        "What is the difference between a crocodile and an alligator?",
        "Alligators have a wide, U-shaped snout and their lower teeth are hidden when the mouth is closed. "
        "Crocodiles have a narrower, V-shaped snout and the fourth lower tooth stays visible. Alligators live "
        "mainly in fresh water in the USA and China, while many crocodiles tolerate salt water.",
        "alligator vs crocodile whats the diff",
        "snout shape mostly",
        "Alligators are just young crocodiles; they become crocodiles when they grow up.",
    ),
    (
        "dolly",
        "How does a bill become a law in the United States?",
        "A member of Congress introduces the bill, a committee reviews and amends it, and then both the House "
        "and the Senate must pass the same text. The President can sign it into law or veto it; Congress can "
        "override a veto with a two-thirds vote in both chambers.",
        "how do laws get made in the US",
        "congress votes then president signs",
        "The Supreme Court writes the bill and the President votes on it.",
    ),
    (
        "dolly",
        "Classify each of these as a fruit or a vegetable: apple, carrot, banana, spinach, mango.",
        "Fruits: apple, banana, mango. Vegetables: carrot, spinach.",
        "apple carrot banana spinach mango - fruit or veg?",
        "apple fruit carrot veg",
        "Fruits: apple, carrot, banana. Vegetables: spinach, mango.",
    ),
    (
        "dolly",
        "Give me some tips for getting better sleep.",
        "Keep a regular schedule, even at weekends. Keep the bedroom dark, quiet and cool. Avoid caffeine after "
        "early afternoon and heavy meals late in the evening. Put screens away an hour before bed, and get "
        "daylight and exercise during the day.",
        "how to sleep better",
        "dont drink coffee",
        "Drink a strong coffee right before bed so you fall asleep faster.",
    ),
    (
        "dolly",
        "Who was Ada Lovelace?",
        "Ada Lovelace (1815-1852) was an English mathematician who worked with Charles Babbage on his proposed "
        "Analytical Engine. Her notes on the machine include a method for computing Bernoulli numbers, often "
        "called the first published computer program.",
        "who is ada lovelace",
        "first programmer",
        "Ada Lovelace was an American inventor who built the first electronic computer in 1946.",
    ),
    (
        "dolly",
        "What is the tallest mountain in the world?",
        "Mount Everest, on the border of Nepal and China, is the highest mountain above sea level at about 8,849 "
        "metres. Measured from base to peak, Mauna Kea in Hawaii is taller, but most of it is under the sea.",
        "tallest mountain on earth?",
        "everest",
        "K2 is the tallest mountain in the world at 9,500 metres.",
    ),
    (
        "dolly",
        "Why is the sky blue?",
        "Sunlight contains all colours. Air molecules scatter short wavelengths much more than long ones "
        "(Rayleigh scattering), so blue light is scattered across the whole sky and reaches our eyes from every "
        "direction, while the sun itself looks slightly yellow.",
        "sky is blue why",
        "light scattering",
        "The sky is blue because it reflects the colour of the oceans.",
    ),
    (
        "dolly",
        "What are the main causes of inflation?",
        "Inflation usually comes from demand growing faster than supply (demand-pull), from rising production "
        "costs such as energy or wages (cost-push), and from expectations that prices will keep rising. Rapid "
        "growth in the money supply can feed all three.",
        "what causes inflation",
        "printing money",
        "Inflation is caused only by banks raising interest rates.",
    ),
    (
        "dolly",
        "What is a haiku?",
        "A haiku is a short Japanese poem of three lines with five, seven and five syllables. Traditional haiku "
        "capture a single moment in nature and include a seasonal word (kigo).",
        "haiku meaning?",
        "short japanese poem",
        "A haiku is a Japanese poem of fourteen lines that always rhymes.",
    ),
    (
        "dolly",
        "How many players are on a soccer team?",
        "Each side has eleven players on the pitch, one of whom is the goalkeeper. Teams may also name "
        "substitutes; in most competitions up to five substitutions are allowed in a match.",
        "soccer how many players",
        "11",
        "A soccer team has nine players on the field, including two goalkeepers.",
    ),
    (
        "dolly",
        "What is the boiling point of water?",
        "At sea level, pure water boils at 100 degrees Celsius (212 degrees Fahrenheit). At lower air pressure, "
        "for example high in the mountains, it boils at a lower temperature.",
        "water boils at what temp",
        "100",
        "Water always boils at 90 degrees Celsius no matter the pressure.",
    ),
    # -- oasst1: conversational help ---------------------------------------------------------------
    (
        "oasst1",
        "Can you explain what a neural network is in simple terms?",
        "A neural network is a computer program made of many simple units connected in layers. Each unit "
        "multiplies its inputs by weights, adds them up and passes the result on. During training the weights "
        "are adjusted so the network's outputs get closer to the right answers, which lets it learn patterns "
        "such as recognising images or text.",
        "whats a neural net",
        "its like a brain in a computer",
        "A neural network is a network of real neurons grown in a lab and wired to a computer.",
    ),
    (
        "oasst1",
        "How do I make a good cup of pour-over coffee?",
        "Use about 15 grams of medium-fine ground coffee per 250 ml of water just off the boil (around 93 C). "
        "Rinse the paper filter, add the grounds, pour a little water to let them bloom for 30 seconds, then "
        "pour the rest slowly in circles so it drains in about three minutes.",
        "pour over coffee how to",
        "hot water through grounds",
        "Use boiling water straight from the kettle and pour it all at once as fast as possible.",
    ),
    (
        "oasst1",
        "What should I consider when buying a used car?",
        "Check the service history and mileage, look up the model's common faults, and have an independent "
        "mechanic inspect it. Test-drive it at different speeds, check for rust and accident repairs, and make "
        "sure the seller's name matches the registration.",
        "tips buying used car",
        "check the km",
        "You only need to check that the car is clean; mechanical problems are rare in used cars.",
    ),
    (
        "oasst1",
        "How can I improve my public speaking?",
        "Prepare a clear structure with one main message, rehearse out loud several times, and record yourself "
        "to spot filler words. Speak slower than feels natural, make eye contact, and start with small audiences "
        "to build confidence.",
        "i get nervous speaking in public, help",
        "practice",
        "Memorise every word and read it as fast as possible so it is over quickly.",
    ),
    (
        "oasst1",
        "What is the difference between RAM and storage?",
        "RAM is fast, temporary memory that holds the programs and data in use right now; it is cleared when the "
        "computer turns off. Storage (an SSD or hard drive) is slower but keeps files permanently, and is usually "
        "much larger.",
        "ram vs storage??",
        "ram is temporary",
        "RAM and storage are the same thing; RAM is just the old name for a hard drive.",
    ),
    (
        "oasst1",
        "Write a short, polite email declining a meeting invitation.",
        "Subject: Re: Project sync on Thursday\n\nHi Sam,\n\nThank you for the invitation. Unfortunately I have a "
        "conflict on Thursday and will not be able to attend. Could you share the notes afterwards? I am happy "
        "to follow up on anything that needs my input.\n\nBest regards,\nAlex",
        "email to say no to meeting",
        "cant come sorry",
        "Hi, I don't want to come to your meeting. Bye.",
    ),
    (
        "oasst1",
        "How do vaccines work?",
        "A vaccine exposes the immune system to a harmless form or piece of a pathogen, such as an inactivated "
        "virus or a protein. The body makes antibodies and memory cells against it, so if the real pathogen "
        "appears later the immune system recognises it and responds much faster.",
        "how do vaccines even work",
        "they train the immune system",
        "Vaccines work by killing all the bacteria in your body so you cannot get sick.",
    ),
    (
        "oasst1",
        "What is a good way to start learning to play the guitar?",
        "Start with a comfortable acoustic or electric guitar, learn to tune it, and practise a few open chords "
        "such as G, C, D and E minor. Play for 15-20 minutes a day, switch between chords slowly, and learn "
        "simple songs that use them.",
        "learning guitar where to start",
        "learn chords",
        "Begin with advanced solos; chords are only for experts.",
    ),
    (
        "oasst1",
        "Explain compound interest with an example.",
        "Compound interest is interest earned on both the original amount and the interest already added. If "
        "you invest 1,000 at 5% a year, after one year you have 1,050; in the second year you earn 5% of 1,050, "
        "giving 1,102.50, and so on.",
        "compound interest example pls",
        "interest on interest",
        "Compound interest means you earn the same 5% of the original 1,000 every year, so 1,100 after two years.",
    ),
    (
        "oasst1",
        "How do I keep houseplants alive?",
        "Match each plant to the light it gets, water only when the top few centimetres of soil are dry, and use "
        "pots with drainage holes. Most plants die from overwatering, so check the soil before watering and feed "
        "them lightly in spring and summer.",
        "my plants keep dying",
        "water them",
        "Water every plant every day and keep them away from windows.",
    ),
    (
        "oasst1",
        "What is the difference between weather and climate?",
        "Weather is the state of the atmosphere over hours or days: temperature, rain, wind. Climate is the "
        "average pattern of weather in a region over decades, usually 30 years or more.",
        "weather vs climate",
        "climate is long term",
        "Weather and climate mean the same thing, just in different countries.",
    ),
    # -- alpaca: short instructions, some in instruction/input/output layout -----------------------
    (
        "alpaca",
        "Name three primary colours.",
        "The three primary colours of paint are red, yellow and blue. For light (additive colour) they are red, "
        "green and blue.",
        "primary colours?",
        "red blue yellow",
        "The primary colours are green, orange and purple.",
    ),
    (
        "alpaca",
        "Give three tips for staying healthy.",
        "1. Eat a balanced diet with plenty of vegetables, fruit and whole grains. 2. Exercise regularly, for "
        "example 150 minutes of moderate activity a week. 3. Get seven to nine hours of sleep each night.",
        "tips healthy",
        "eat well",
        "1. Skip breakfast. 2. Avoid all fats. 3. Sleep four hours a night.",
    ),
    (
        "alpaca",
        "Convert 25 degrees Celsius to Fahrenheit.",
        "Multiply by 9/5 and add 32: 25 x 9/5 = 45, and 45 + 32 = 77. So 25 degrees Celsius is 77 degrees Fahrenheit.",
        "25C in F",
        "77",
        "25 degrees Celsius is 57 degrees Fahrenheit.",
    ),
    (
        "alpaca",
        "What is the capital of Australia?",
        "The capital of Australia is Canberra. It was chosen as a compromise between Sydney and Melbourne and "
        "became the seat of government in 1927.",
        "australia capital city",
        "canberra",
        "The capital of Australia is Sydney.",
    ),
    (
        "alpaca",
        "Explain what photosynthesis is.",
        "Photosynthesis is the process by which plants, algae and some bacteria use light energy to turn carbon "
        "dioxide and water into glucose and oxygen. It takes place mainly in the chloroplasts of leaf cells.",
        "photosynthesis explain",
        "plants make food from light",
        "Photosynthesis is how plants breathe in oxygen and breathe out carbon dioxide at night.",
    ),
    (
        "alpaca",
        "Describe the water cycle.",
        "Water evaporates from oceans and lakes, rises and cools to form clouds (condensation), falls as rain or "
        "snow (precipitation), and returns to the sea through rivers and groundwater (collection), where the "
        "cycle starts again.",
        "water cycle steps",
        "evaporation and rain",
        "The water cycle is when water freezes in winter and melts in summer.",
    ),
    (
        "alpaca",
        "Generate a list of five synonyms for 'happy'.",
        "Cheerful, joyful, content, delighted, glad.",
        "other words for happy",
        "glad",
        "Sad, gloomy, cheerful, angry, content.",
    ),
    (
        "alpaca",
        "Summarize the plot of Romeo and Juliet in two sentences.",
        "Two young lovers from feuding families in Verona marry in secret. A chain of misunderstandings leads "
        "Romeo to believe Juliet is dead, and both take their own lives, which finally reconciles their families.",
        "romeo and juliet short summary",
        "they fall in love and die",
        "Romeo and Juliet are siblings who run away to Paris and live happily ever after.",
    ),
    (
        "alpaca",
        "What is the Pythagorean theorem?",
        "In a right-angled triangle, the square of the hypotenuse equals the sum of the squares of the other two "
        "sides: a^2 + b^2 = c^2. For example, sides 3 and 4 give a hypotenuse of 5.",
        "pythagoras theorem",
        "a2+b2=c2",
        "The Pythagorean theorem says the three angles of any triangle add up to 360 degrees.",
    ),
    (
        "alpaca",
        "Rewrite the sentence in the passive voice: The chef cooked a delicious meal.",
        "A delicious meal was cooked by the chef.",
        "passive voice: The chef cooked a delicious meal",
        "meal was cooked",
        "The chef is cooking a delicious meal.",
    ),
    (
        "alpaca",
        "Calculate the area of a circle with a radius of 3 cm.",
        "Area = pi x r^2 = 3.1416 x 9 = about 28.27 square centimetres.",
        "area circle r=3",
        "28",
        "The area is 2 x pi x 3 = 18.85 square centimetres.",
    ),
    # -- wizardlm: longer, reasoning-heavy instructions --------------------------------------------
    (
        "wizardlm",
        "Explain the difference between a process and a thread in an operating system.",
        "A process is a running program with its own address space, file handles and resources; processes are "
        "isolated from each other. A thread is a unit of execution inside a process: threads of one process "
        "share its memory, so they are cheaper to create and can communicate directly, but need locks to avoid "
        "data races.",
        "process vs thread os",
        "threads share memory",
        "A thread is a bigger version of a process that can contain several processes.",
    ),
    (
        "wizardlm",
        "What is the time complexity of binary search, and why?",
        "Binary search runs in O(log n) time. Each comparison with the middle element halves the part of the "
        "sorted array that can still contain the target, so after k steps n/2^k elements remain, and it ends "
        "after about log2(n) steps.",
        "binary search complexity",
        "log n",
        "Binary search is O(n) because it has to look at every element once.",
    ),
    (
        "wizardlm",
        "Write a Python function that checks whether a string is a palindrome.",
        "def is_palindrome(s: str) -> bool:\n    cleaned = [c.lower() for c in s if c.isalnum()]\n    return "
        "cleaned == cleaned[::-1]\n\nIt ignores case, spaces and punctuation, so 'A man, a plan, a canal: "
        "Panama' returns True.",
        "python palindrome check",
        "return s == s[::-1]",
        "def is_palindrome(s):\n    return s == s.reverse()",
    ),
    (
        "wizardlm",
        "Explain what a database index is and when you should use one.",
        "An index is an extra data structure, usually a B-tree, that maps column values to rows so the database "
        "can find matching rows without scanning the whole table. Use it on columns that appear often in WHERE, "
        "JOIN or ORDER BY clauses; avoid too many indexes on write-heavy tables, because every insert and update "
        "must maintain them.",
        "db index what is it",
        "makes queries faster",
        "An index is a backup copy of the table that makes inserts faster.",
    ),
    (
        "wizardlm",
        "What are the SOLID principles in software design?",
        "SOLID stands for Single responsibility (a class has one reason to change), Open/closed (open for "
        "extension, closed for modification), Liskov substitution (subtypes must be usable as their base type), "
        "Interface segregation (many small interfaces rather than one large one) and Dependency inversion "
        "(depend on abstractions, not concrete classes).",
        "solid principles explain",
        "five design rules",
        "SOLID means Simple, Object-oriented, Linear, Isolated and Documented code.",
    ),
    (
        "wizardlm",
        "Describe how public-key cryptography works.",
        "Each party has a key pair: a public key that anyone may know and a private key kept secret. Data "
        "encrypted with the public key can only be decrypted with the matching private key, and a signature made "
        "with the private key can be verified with the public key. Security rests on problems such as factoring "
        "large numbers being hard.",
        "public key crypto how",
        "two keys",
        "Public-key cryptography uses one shared password that both sides write down.",
    ),
    (
        "wizardlm",
        "Explain the concept of supply and demand.",
        "Demand is how much of a good buyers want at each price; it usually falls as price rises. Supply is how "
        "much sellers offer at each price; it usually rises with price. The market price settles where the two "
        "curves meet, and shifts in either curve move that equilibrium.",
        "supply and demand basics",
        "price goes up when demand up",
        "Supply and demand means the government sets all prices each year.",
    ),
    (
        "wizardlm",
        "What is recursion in programming? Give an example.",
        "Recursion is when a function calls itself on a smaller version of the problem until it reaches a base "
        "case. For example, factorial(n) returns 1 when n is 0 and n * factorial(n - 1) otherwise.",
        "recursion example",
        "function calls itself",
        "Recursion is a loop that runs forever; it has no stopping condition.",
    ),
    (
        "wizardlm",
        "Compare TCP and UDP.",
        "TCP is connection-oriented: it guarantees ordered, reliable delivery with acknowledgements, "
        "retransmission and congestion control, at the cost of latency. UDP sends independent datagrams with no "
        "delivery guarantee or ordering, which makes it lighter and faster, so it suits streaming, games and DNS.",
        "tcp vs udp",
        "udp is faster",
        "UDP is more reliable than TCP because it checks every packet twice.",
    ),
    (
        "wizardlm",
        "Explain how a hash table achieves constant-time lookups.",
        "A hash function maps each key to an index in an array of buckets, so a lookup computes the hash and "
        "jumps straight to the bucket. Collisions are handled by chaining or open addressing, and the table "
        "grows when it gets too full, which keeps the average lookup O(1).",
        "hash table why O(1)",
        "hashing",
        "A hash table keeps keys sorted and uses binary search, so lookups are O(1).",
    ),
    # -- flan_v2: templated NLP tasks ------------------------------------------------------------
    (
        "flan_v2",
        "Translate to French: 'Where is the train station?'",
        "Où est la gare ?",
        "french for where is the train station",
        "ou est gare",
        "Où est l'aéroport ?",
    ),
    (
        "flan_v2",
        "Is the following review positive or negative? 'The food was cold and the waiter ignored us "
        "for half an hour.'",
        "Negative. The reviewer complains about cold food and slow, inattentive service.",
        "review sentiment: food cold, waiter ignored us",
        "neg",
        "Positive, because the reviewer stayed for half an hour.",
    ),
    (
        "flan_v2",
        "Premise: 'A man is playing a guitar on stage.' Hypothesis: 'A man is performing music.' Does "
        "the premise entail the hypothesis?",
        "Yes. Playing a guitar on stage is a way of performing music, so the hypothesis follows from the premise.",
        "man playing guitar on stage -> man performing music? entailment",
        "yes",
        "No, because the premise does not say anyone is listening.",
    ),
    (
        "flan_v2",
        "Answer the question: What gas do plants absorb from the air?",
        "Plants absorb carbon dioxide (CO2) from the air and use it in photosynthesis to make sugars.",
        "what gas plants take in",
        "co2",
        "Plants absorb oxygen from the air and release nitrogen.",
    ),
    (
        "flan_v2",
        "Write a one-sentence summary: 'The city council voted on Tuesday to expand the bike lane "
        "network by 40 kilometres over the next three years, funded by a new parking fee.'",
        "The city council approved a parking-fee-funded plan to add 40 km of bike lanes over three years.",
        "summarise: council votes 40km more bike lanes, parking fee",
        "more bike lanes",
        "The council banned bikes from the city centre for three years.",
    ),
    (
        "flan_v2",
        "Which is heavier, a kilogram of feathers or a kilogram of iron?",
        "Neither: both weigh one kilogram. The iron is much denser, so it takes up far less space.",
        "kg feathers vs kg iron",
        "same",
        "The kilogram of iron is heavier because iron is a metal.",
    ),
    (
        "flan_v2",
        "Extract the name of the person from the sentence: 'Yesterday, Maria Lopez opened a bakery on Main Street.'",
        "Maria Lopez",
        "who is the person: Maria Lopez opened a bakery",
        "maria",
        "Main Street",
    ),
    (
        "flan_v2",
        "Is this sentence grammatically correct? 'She don't like apples.'",
        "No. With a third-person singular subject the verb needs 'does': 'She doesn't like apples.'",
        "grammar check: She don't like apples",
        "no",
        "Yes, 'She don't like apples' is correct standard English.",
    ),
    (
        "flan_v2",
        "What is the opposite of 'ancient'?",
        "Modern. Other antonyms include new, recent and contemporary.",
        "antonym of ancient",
        "new",
        "Old.",
    ),
    (
        "flan_v2",
        "Solve: If a train travels 120 km in 2 hours, what is its average speed?",
        "Average speed = distance / time = 120 km / 2 h = 60 km/h.",
        "train 120km 2h speed",
        "60",
        "The average speed is 240 km/h.",
    ),
]

# Standalone clean rows with no noisy twin: the "already high quality" share of a real pool.
CLEAN: list[tuple[str, str, str]] = [
    (
        "dolly",
        "What is the largest ocean on Earth?",
        "The Pacific Ocean is the largest and deepest ocean, covering about 165 million square kilometres, more "
        "than all the land on Earth combined.",
    ),
    (
        "dolly",
        "What does a pharmacist do?",
        "A pharmacist dispenses prescription medicines, checks doses and drug interactions, advises patients on "
        "how to take their medicines safely, and can recommend treatments for minor ailments.",
    ),
    (
        "oasst1",
        "How do I politely ask my neighbour to turn down their music?",
        "Pick a calm moment, knock and introduce yourself if needed, and say something like: 'Hi, sorry to bother "
        "you. The music carries into my flat quite a lot in the evenings; could you turn it down a bit after 10?' "
        "Being friendly and specific usually works better than a note.",
    ),
    (
        "oasst1",
        "What are some good habits for managing personal finances?",
        "Track where your money goes, set a monthly budget, build an emergency fund of three to six months of "
        "expenses, pay off high-interest debt first, and automate saving a fixed share of each pay cheque.",
    ),
    (
        "alpaca",
        "Explain why the moon has phases.",
        "The moon does not make its own light; we see the half lit by the sun. As it orbits Earth over about 29.5 "
        "days, we see different portions of that lit half, from new moon to full moon and back.",
    ),
    (
        "alpaca",
        "List the planets of the solar system in order from the sun.",
        "Mercury, Venus, Earth, Mars, Jupiter, Saturn, Uranus and Neptune.",
    ),
    (
        "wizardlm",
        "What is the difference between a list and a tuple in Python?",
        "Lists are mutable: you can add, remove and change elements. Tuples are immutable once created, so they "
        "can be used as dictionary keys and signal that the data should not change. Both keep order and allow "
        "mixed types.",
    ),
    (
        "wizardlm",
        "Explain what Big O notation describes.",
        "Big O notation describes how the running time or memory of an algorithm grows with the input size n in "
        "the worst case, ignoring constant factors; for example O(n) grows linearly and O(n^2) quadratically.",
    ),
    ("flan_v2", "Translate to Spanish: 'Thank you very much for your help.'", "Muchas gracias por tu ayuda."),
    (
        "flan_v2",
        "Is a tomato a fruit or a vegetable?",
        "Botanically, a tomato is a fruit because it develops from the flower and contains seeds; in cooking it "
        "is usually treated as a vegetable.",
    ),
]

_VAGUE = ["tell me about {t}", "{t}?", "info on {t} pls", "can u explain {t}", "{t} question"]


def typo(text: str, rng: random.Random, rate: float = 0.06) -> str:
    """Swap, drop or double a few letters, as hurried typing does."""
    chars = list(text)
    i = 0
    while i < len(chars) - 1:
        if chars[i].isalpha() and rng.random() < rate:
            op = rng.randrange(3)
            if op == 0:
                chars[i], chars[i + 1] = chars[i + 1], chars[i]
            elif op == 1:
                del chars[i]
            else:
                chars.insert(i, chars[i])
            i += 2
        i += 1
    return "".join(chars)


def first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".") + "."


def topic_words(question: str) -> str:
    words = [w.strip("?.,:'\"").lower() for w in question.split()]
    return " ".join(w for w in words[-4:] if w)


def variants(source: str, q: str, a: str, casual: str, terse: str, wrong: str, rng: random.Random) -> list[dict]:
    """The clean row plus 3-5 noisy variants of it."""
    rows = [{"prompt": q, "completion": a, "source": source}]
    noisy = [
        {"prompt": casual, "completion": terse},
        {"prompt": typo(q, rng), "completion": typo(first_sentence(a), rng)},
        {"prompt": casual.capitalize(), "completion": wrong},
        {"prompt": rng.choice(_VAGUE).format(t=topic_words(q)), "completion": a.split(",")[0].rstrip(".") + "..."},
        {"prompt": q.lower().rstrip("?."), "completion": typo(terse, rng, 0.1) + " i think"},
    ]
    keep = rng.randint(3, 5)
    for row in rng.sample(noisy, keep):
        rows.append({**row, "source": source})
    return rows


def build(seed: int = 7) -> list[str]:
    return build_with_topics(seed)[0]


def build_with_topics(seed: int = 7) -> tuple[list[str], dict[str, int]]:
    """The pool's lines and, for every valid row id, the topic it is a variant of (the index in
    ``TOPICS``; -1 for the clean rows that stand alone): the ground truth for clustering."""
    rng = random.Random(seed)
    rows: list[dict] = []
    for t, topic in enumerate(TOPICS):
        rows.extend({**row, "_topic": t} for row in variants(*topic, rng=rng))
    rows.extend({"prompt": q, "completion": a, "source": s, "_topic": -1} for s, q, a in CLEAN)
    rng.shuffle(rows)
    lines = []
    topics: dict[str, int] = {}
    for i, row in enumerate(rows):
        topic = row.pop("_topic")
        row = {"id": f"{row['source']}-{i:04d}", **row}
        topics[row["id"]] = topic
        if row["source"] == "alpaca" and i % 4 == 0 and ": " in row["prompt"]:
            instr, inp = row["prompt"].split(": ", 1)
            row = {
                "id": row["id"],
                "instruction": instr + ":",
                "input": inp,
                "output": row["completion"],
                "source": "alpaca",
            }
        lines.append(json.dumps(row, ensure_ascii=False))
    # Deliberately broken rows, to show quarantine at work.
    lines.insert(
        17,
        json.dumps(
            {"id": "dolly-bad-1", "prompt": "What is the speed of light?", "completion": "", "source": "dolly"}
        ),
    )
    lines.insert(101, '{"id": "oasst1-bad-2", "prompt": "How do magnets work?", "completion": "They have')
    lines.insert(202, json.dumps({"id": "alpaca-bad-3", "completion": "Blue.", "source": "alpaca"}))
    return lines, topics


if __name__ == "__main__":
    out = Path(__file__).with_name("sample_pool.jsonl")
    lines, topics = build_with_topics()
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    labels = out.with_name("sample_pool_topics.json")
    labels.write_text(json.dumps(topics, indent=0) + "\n", encoding="utf-8")
    print(
        f"wrote {len(lines)} lines to {out} ({out.stat().st_size / 1024:.0f} KB) and {len(topics)} labels to {labels}"
    )
