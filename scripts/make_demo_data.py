"""Write instructune's ``demo`` data set: short instruction records in the book's style.

Every record is written for this project (Apache-2.0). Word lists and facts are typed in here;
arithmetic, unit conversions, sorting and counting are computed, so their answers are exact.
The output is deterministic: running this script again gives the same file byte for byte.

    python scripts/make_demo_data.py            # writes src/instructune/assets/demo.json
    python scripts/make_demo_data.py --check    # fails if the shipped file is out of date
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "instructune" / "assets" / "demo.json"
SEED = 20251125

ANTONYMS = [
    ("hot", "cold"),
    ("happy", "sad"),
    ("early", "late"),
    ("strong", "weak"),
    ("rich", "poor"),
    ("heavy", "light"),
    ("open", "closed"),
    ("asleep", "awake"),
    ("start", "finish"),
    ("tall", "short"),
    ("wide", "narrow"),
    ("buy", "sell"),
    ("arrive", "depart"),
    ("visible", "invisible"),
    ("polite", "rude"),
    ("smooth", "rough"),
    ("noisy", "quiet"),
    ("shallow", "deep"),
    ("entrance", "exit"),
    ("maximum", "minimum"),
    ("ascend", "descend"),
    ("victory", "defeat"),
    ("include", "exclude"),
    ("import", "export"),
    ("frequent", "rare"),
    ("horizontal", "vertical"),
    ("optimistic", "pessimistic"),
    ("temporary", "permanent"),
    ("artificial", "natural"),
    ("guilty", "innocent"),
    ("majority", "minority"),
    ("borrow", "lend"),
    ("forget", "remember"),
    ("win", "lose"),
    ("float", "sink"),
    ("cheap", "expensive"),
    ("dangerous", "safe"),
    ("inside", "outside"),
    ("friend", "enemy"),
    ("dry", "wet"),
    ("clean", "dirty"),
    ("loose", "tight"),
    ("young", "old"),
    ("brave", "cowardly"),
    ("increase", "decrease"),
]
SYNONYMS = [
    ("big", "large"),
    ("small", "tiny"),
    ("begin", "start"),
    ("smart", "intelligent"),
    ("angry", "irate"),
    ("fast", "speedy"),
    ("difficult", "hard"),
    ("easy", "simple"),
    ("beautiful", "lovely"),
    ("quiet", "silent"),
    ("brave", "courageous"),
    ("tired", "weary"),
    ("shout", "yell"),
    ("purchase", "buy"),
    ("help", "assist"),
    ("choose", "select"),
    ("hide", "conceal"),
    ("answer", "reply"),
    ("funny", "amusing"),
    ("strange", "odd"),
    ("enormous", "huge"),
    ("wealthy", "rich"),
    ("error", "mistake"),
    ("gift", "present"),
    ("ill", "sick"),
    ("talk", "speak"),
    ("damp", "moist"),
    ("fix", "repair"),
]
PLURALS = [
    ("child", "children"),
    ("man", "men"),
    ("woman", "women"),
    ("tooth", "teeth"),
    ("foot", "feet"),
    ("goose", "geese"),
    ("person", "people"),
    ("ox", "oxen"),
    ("cactus", "cacti"),
    ("leaf", "leaves"),
    ("knife", "knives"),
    ("wolf", "wolves"),
    ("half", "halves"),
    ("sheep", "sheep"),
    ("deer", "deer"),
    ("potato", "potatoes"),
    ("hero", "heroes"),
    ("city", "cities"),
    ("box", "boxes"),
    ("bus", "buses"),
    ("crisis", "crises"),
    ("criterion", "criteria"),
]
PAST_TENSE = [
    ("go", "went"),
    ("eat", "ate"),
    ("see", "saw"),
    ("take", "took"),
    ("write", "wrote"),
    ("run", "ran"),
    ("begin", "began"),
    ("drink", "drank"),
    ("sing", "sang"),
    ("fly", "flew"),
    ("throw", "threw"),
    ("bring", "brought"),
    ("buy", "bought"),
    ("think", "thought"),
    ("teach", "taught"),
    ("catch", "caught"),
    ("choose", "chose"),
    ("speak", "spoke"),
    ("freeze", "froze"),
    ("drive", "drove"),
    ("ride", "rode"),
    ("break", "broke"),
    ("forget", "forgot"),
    ("steal", "stole"),
    ("wear", "wore"),
    ("build", "built"),
    ("send", "sent"),
    ("sleep", "slept"),
    ("keep", "kept"),
    ("feel", "felt"),
]
SUPERLATIVES = [
    ("good", "best"),
    ("bad", "worst"),
    ("big", "biggest"),
    ("happy", "happiest"),
    ("tall", "tallest"),
    ("easy", "easiest"),
    ("thin", "thinnest"),
    ("hot", "hottest"),
    ("small", "smallest"),
    ("busy", "busiest"),
]
GRAMMAR = [
    ("He go to school every day.", "He goes to school every day."),
    ("They was late for the meeting.", "They were late for the meeting."),
    ("I has two brothers.", "I have two brothers."),
    ("She can sings very well.", "She can sing very well."),
    ("We is going to the park.", "We are going to the park."),
    ("The children plays in the garden.", "The children play in the garden."),
    ("He didn't went to the party.", "He didn't go to the party."),
    ("There is many books on the shelf.", "There are many books on the shelf."),
    ("Me and my sister like pizza.", "My sister and I like pizza."),
    ("She is more taller than her brother.", "She is taller than her brother."),
    ("I seen that movie last week.", "I saw that movie last week."),
    ("The dog wagged it's tail.", "The dog wagged its tail."),
    ("Their going to the beach tomorrow.", "They're going to the beach tomorrow."),
    ("He runned to the bus stop.", "He ran to the bus stop."),
    ("Each of the students have a book.", "Each of the students has a book."),
    ("I am agree with you.", "I agree with you."),
    ("She has lived here since five years.", "She has lived here for five years."),
    ("The news are very good today.", "The news is very good today."),
    ("Neither of them were ready.", "Neither of them was ready."),
    ("I look forward to meet you.", "I look forward to meeting you."),
    ("He speak three languages.", "He speaks three languages."),
    ("We have went there before.", "We have gone there before."),
    ("Your the best player on the team.", "You're the best player on the team."),
    ("She don't know the answer.", "She doesn't know the answer."),
    ("The cat are sleeping on the sofa.", "The cat is sleeping on the sofa."),
]
GRAMMAR_ASKS = [
    "Correct the grammar in the following sentence.",
    "Fix the grammatical error in this sentence.",
    "Rewrite the sentence with correct grammar.",
    "Edit the sentence to make it grammatically correct.",
]
SPELLING = [
    ("accomodate", "accommodate"),
    ("definately", "definitely"),
    ("seperate", "separate"),
    ("occured", "occurred"),
    ("untill", "until"),
    ("goverment", "government"),
    ("tommorow", "tomorrow"),
    ("beleive", "believe"),
    ("wierd", "weird"),
    ("neccessary", "necessary"),
    ("calender", "calendar"),
    ("enviroment", "environment"),
    ("existance", "existence"),
    ("begining", "beginning"),
    ("arguement", "argument"),
    ("publically", "publicly"),
    ("truely", "truly"),
    ("rythm", "rhythm"),
    ("independant", "independent"),
    ("foriegn", "foreign"),
]
PASSIVE = [
    ("The chef cooked the meal.", "The meal was cooked by the chef."),
    ("The wind broke the window.", "The window was broken by the wind."),
    ("Maria wrote the letter.", "The letter was written by Maria."),
    ("The students painted the mural.", "The mural was painted by the students."),
    ("The committee approved the plan.", "The plan was approved by the committee."),
    ("A bee stung the boy.", "The boy was stung by a bee."),
    ("The mechanic repaired the car.", "The car was repaired by the mechanic."),
    ("The teacher graded the tests.", "The tests were graded by the teacher."),
    ("The company hired two engineers.", "Two engineers were hired by the company."),
    ("The storm destroyed the bridge.", "The bridge was destroyed by the storm."),
]
ACTIVE = [
    ("The cake was baked by Tom.", "Tom baked the cake."),
    ("The song was sung by the choir.", "The choir sang the song."),
    ("The ball was kicked by the player.", "The player kicked the ball."),
    ("The email was sent by my manager.", "My manager sent the email."),
    ("The house was built by my grandfather.", "My grandfather built the house."),
    ("The door was locked by the guard.", "The guard locked the door."),
]
TENSES = [
    (
        "Rewrite the sentence in the past tense.",
        "I walk to the station.",
        "I walked to the station.",
    ),
    ("Rewrite the sentence in the past tense.", "She plays the piano.", "She played the piano."),
    ("Rewrite the sentence in the past tense.", "They watch a film.", "They watched a film."),
    ("Rewrite the sentence in the past tense.", "He writes a poem.", "He wrote a poem."),
    ("Rewrite the sentence in the past tense.", "We eat lunch at noon.", "We ate lunch at noon."),
    (
        "Rewrite the sentence in the future tense.",
        "She visits her aunt.",
        "She will visit her aunt.",
    ),
    (
        "Rewrite the sentence in the future tense.",
        "They finish the project.",
        "They will finish the project.",
    ),
    ("Rewrite the sentence in the future tense.", "He cooks dinner.", "He will cook dinner."),
    ("Convert the sentence into a question.", "She is at home.", "Is she at home?"),
    ("Convert the sentence into a question.", "They are ready.", "Are they ready?"),
    ("Convert the sentence into a question.", "He can swim.", "Can he swim?"),
    ("Convert the sentence into a question.", "You like tea.", "Do you like tea?"),
    ("Convert the sentence into a question.", "The train has left.", "Has the train left?"),
    ("Make the sentence negative.", "He likes coffee.", "He does not like coffee."),
    ("Make the sentence negative.", "We are hungry.", "We are not hungry."),
    ("Make the sentence negative.", "She can drive.", "She cannot drive."),
    ("Make the sentence negative.", "They went home.", "They did not go home."),
    (
        "Rewrite the sentence in a more formal tone.",
        "Gonna be late, sorry.",
        "I apologize, but I will be late.",
    ),
    (
        "Rewrite the sentence in a more formal tone.",
        "Thanks a lot for the help!",
        "Thank you very much for your assistance.",
    ),
    (
        "Rewrite the sentence in a more formal tone.",
        "Can't make it to the meeting.",
        "I am unable to attend the meeting.",
    ),
    (
        "Rewrite the sentence in a more formal tone.",
        "The boss wants the report ASAP.",
        "The manager would like the report as soon as possible.",
    ),
    (
        "Rewrite the sentence in a more formal tone.",
        "Send me the stuff by Friday.",
        "Please send me the materials by Friday.",
    ),
]
ANIMALS = [
    ("Dog", "mammal"),
    ("Whale", "mammal"),
    ("Bat", "mammal"),
    ("Dolphin", "mammal"),
    ("Elephant", "mammal"),
    ("Eagle", "bird"),
    ("Ostrich", "bird"),
    ("Owl", "bird"),
    ("Sparrow", "bird"),
    ("Shark", "fish"),
    ("Salmon", "fish"),
    ("Trout", "fish"),
    ("Tuna", "fish"),
    ("Frog", "amphibian"),
    ("Salamander", "amphibian"),
    ("Toad", "amphibian"),
    ("Snake", "reptile"),
    ("Lizard", "reptile"),
    ("Crocodile", "reptile"),
    ("Turtle", "reptile"),
    ("Ant", "insect"),
    ("Butterfly", "insect"),
    ("Beetle", "insect"),
    ("Bee", "insect"),
]
PRODUCE = [
    ("Apple", "fruit"),
    ("Banana", "fruit"),
    ("Mango", "fruit"),
    ("Cherry", "fruit"),
    ("Pear", "fruit"),
    ("Grape", "fruit"),
    ("Pineapple", "fruit"),
    ("Potato", "vegetable"),
    ("Spinach", "vegetable"),
    ("Broccoli", "vegetable"),
    ("Cabbage", "vegetable"),
    ("Onion", "vegetable"),
    ("Lettuce", "vegetable"),
    ("Celery", "vegetable"),
    ("Cauliflower", "vegetable"),
]
SENTIMENT = [
    ("The service was quick and the staff were friendly.", "positive"),
    ("I waited an hour and my order was wrong.", "negative"),
    ("This is the best book I have read all year.", "positive"),
    ("The screen cracked after two days.", "negative"),
    ("The hotel room was spotless and the view was amazing.", "positive"),
    ("The movie was long and boring.", "negative"),
    ("My new headphones sound fantastic.", "positive"),
    ("The instructions were confusing and parts were missing.", "negative"),
    ("We had a wonderful time at the festival.", "positive"),
    ("The soup was cold and far too salty.", "negative"),
    ("The teacher explained everything clearly.", "positive"),
    ("The app keeps crashing when I open it.", "negative"),
    ("What a lovely surprise, thank you!", "positive"),
    ("The train was late again this morning.", "negative"),
]
PARTS_OF_SPEECH = [
    ("happiness", "noun"),
    ("beautiful", "adjective"),
    ("quickly", "adverb"),
    ("explore", "verb"),
    ("silently", "adverb"),
    ("honest", "adjective"),
    ("freedom", "noun"),
    ("describe", "verb"),
    ("enormous", "adjective"),
    ("carefully", "adverb"),
    ("knowledge", "noun"),
    ("arrive", "verb"),
]
CAPITALS = [
    ("France", "Paris"),
    ("Germany", "Berlin"),
    ("Spain", "Madrid"),
    ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"),
    ("China", "Beijing"),
    ("India", "New Delhi"),
    ("Canada", "Ottawa"),
    ("Australia", "Canberra"),
    ("Brazil", "Brasília"),
    ("Argentina", "Buenos Aires"),
    ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"),
    ("Norway", "Oslo"),
    ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"),
    ("Poland", "Warsaw"),
    ("Greece", "Athens"),
    ("Turkey", "Ankara"),
    ("Russia", "Moscow"),
    ("Mexico", "Mexico City"),
    ("Peru", "Lima"),
    ("Chile", "Santiago"),
    ("Ireland", "Dublin"),
    ("Austria", "Vienna"),
    ("Hungary", "Budapest"),
    ("the Czech Republic", "Prague"),
    ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"),
    ("Vietnam", "Hanoi"),
    ("Belgium", "Brussels"),
    ("New Zealand", "Wellington"),
    ("Morocco", "Rabat"),
    ("Nigeria", "Abuja"),
    ("Colombia", "Bogotá"),
    ("Cuba", "Havana"),
]
ELEMENTS = [
    ("gold", "Au"),
    ("silver", "Ag"),
    ("iron", "Fe"),
    ("copper", "Cu"),
    ("sodium", "Na"),
    ("potassium", "K"),
    ("lead", "Pb"),
    ("tin", "Sn"),
    ("mercury", "Hg"),
    ("oxygen", "O"),
    ("hydrogen", "H"),
    ("carbon", "C"),
    ("nitrogen", "N"),
    ("helium", "He"),
    ("calcium", "Ca"),
    ("zinc", "Zn"),
    ("sulfur", "S"),
    ("chlorine", "Cl"),
    ("magnesium", "Mg"),
    ("neon", "Ne"),
    ("aluminum", "Al"),
    ("silicon", "Si"),
    ("uranium", "U"),
    ("tungsten", "W"),
]
FACTS = [
    (
        "What is the boiling point of water at sea level in Celsius?",
        "Water boils at 100 degrees Celsius at sea level.",
    ),
    ("How many days are in a leap year?", "A leap year has 366 days."),
    ("What is the largest ocean on Earth?", "The largest ocean on Earth is the Pacific Ocean."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("Which planet is closest to the Sun?", "Mercury is the closest planet to the Sun."),
    ("How many planets are in the solar system?", "There are eight planets in the solar system."),
    ("Which planet is third from the Sun?", "Earth is the third planet from the Sun."),
    (
        "What gas do plants absorb from the air for photosynthesis?",
        "Plants absorb carbon dioxide for photosynthesis.",
    ),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("What is the hardest natural substance?", "Diamond is the hardest natural substance."),
    ("How many minutes are in an hour?", "There are 60 minutes in an hour."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("How many months of the year have 31 days?", "Seven months of the year have 31 days."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    (
        "What is the tallest mountain above sea level?",
        "Mount Everest is the tallest mountain above sea level.",
    ),
    ("Who wrote 'Pride and Prejudice'?", "'Pride and Prejudice' was written by Jane Austen."),
    ("Who painted the Mona Lisa?", "The Mona Lisa was painted by Leonardo da Vinci."),
    (
        "Who developed the theory of relativity?",
        "The theory of relativity was developed by Albert Einstein.",
    ),
    ("What is the smallest prime number?", "The smallest prime number is 2."),
    (
        "What is the main language spoken in Brazil?",
        "The main language spoken in Brazil is Portuguese.",
    ),
    ("What is the currency of Japan?", "The currency of Japan is the yen."),
    ("How many sides does a triangle have?", "A triangle has three sides."),
    ("How many sides does a pentagon have?", "A pentagon has five sides."),
    ("How many sides does an octagon have?", "An octagon has eight sides."),
    ("What is H2O commonly called?", "H2O is commonly called water."),
    (
        "Which organ pumps blood through the human body?",
        "The heart pumps blood through the human body.",
    ),
    ("How many bones are in the adult human body?", "The adult human body has 206 bones."),
    (
        "What is the freezing point of water in Fahrenheit?",
        "Water freezes at 32 degrees Fahrenheit.",
    ),
    ("What is the largest continent?", "Asia is the largest continent."),
    (
        "How many players does a soccer team have on the field?",
        "A soccer team has eleven players on the field.",
    ),
    ("Which planet has the most prominent rings?", "Saturn has the most prominent rings."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many centimeters are in a meter?", "There are 100 centimeters in a meter."),
]
LISTS = [
    ("List three types of renewable energy.", "Solar, wind and hydroelectric power."),
    ("Name three mammals that live in the ocean.", "Whales, dolphins and seals."),
    ("List the four seasons.", "Spring, summer, autumn and winter."),
    ("Name three states of matter.", "Solid, liquid and gas."),
    ("List three string instruments.", "Guitar, violin and cello."),
    ("Name the three primary colors of light.", "Red, green and blue."),
    ("List the vowels of the English alphabet.", "A, E, I, O and U."),
    (
        "List three ways to save water at home.",
        "Fix leaks, take shorter showers and turn off the tap while brushing your teeth.",
    ),
    ("List three common kitchen utensils.", "A spoon, a whisk and a spatula."),
    (
        "Name the three kinds of triangles classified by their sides.",
        "Equilateral, isosceles and scalene.",
    ),
    ("List the first five prime numbers.", "2, 3, 5, 7 and 11."),
    ("List the first four multiples of 6.", "6, 12, 18 and 24."),
    ("Name three noble gases.", "Helium, neon and argon."),
    ("List three parts of a plant.", "Roots, stem and leaves."),
    ("Name the two days of the weekend.", "Saturday and Sunday."),
    ("List three planets that are closer to the Sun than Jupiter.", "Mercury, Venus and Earth."),
]
WORDS = [
    "apple",
    "river",
    "candle",
    "garden",
    "mountain",
    "pencil",
    "window",
    "orange",
    "tiger",
    "violin",
    "basket",
    "island",
    "lemon",
    "forest",
    "rocket",
    "bridge",
    "castle",
    "dolphin",
    "jacket",
    "meadow",
    "planet",
    "silver",
    "thunder",
    "umbrella",
    "yellow",
    "zebra",
    "anchor",
    "elephant",
    "harbor",
    "kitten",
]
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "She reads a book every night before bed.",
    "Our team won the final match.",
    "Please close the door when you leave.",
    "The museum opens at nine in the morning.",
    "Birds sing in the tall oak tree.",
    "He forgot his umbrella at the office.",
    "We planted tomatoes in the garden last spring.",
]
# (from, to, factor, from_singular): "X <from> is X*factor <to>."
UNITS = [
    ("kilometers", "meters", 1000),
    ("meters", "centimeters", 100),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("liters", "milliliters", 1000),
    ("days", "hours", 24),
    ("weeks", "days", 7),
    ("feet", "inches", 12),
    ("yards", "feet", 3),
    ("centimeters", "millimeters", 10),
]


def article(word: str) -> str:
    return "an" if word[0].lower() in "aeiou" else "a"


def is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def build(rng: random.Random) -> list[dict[str, str]]:
    out: list[tuple[str, str, str]] = []

    def add(instruction: str, output: str, inp: str = "") -> None:
        out.append((instruction, inp, output))

    for i, (word, opposite) in enumerate(ANTONYMS):
        if i % 2:
            add(f"What is an antonym of '{word}'?", f"An antonym of '{word}' is '{opposite}'.")
        else:
            add(f"Give the opposite of '{word}'.", f"The opposite of '{word}' is '{opposite}'.")
    for i, (word, same) in enumerate(SYNONYMS):
        if i % 3 == 0:
            add(
                "Give a synonym for the following word.",
                f"A synonym for '{word}' is '{same}'.",
                word,
            )
        else:
            add(f"What is a synonym for '{word}'?", f"A synonym for '{word}' is '{same}'.")
    for word, plural in PLURALS:
        add(f"What is the plural of '{word}'?", f"The plural of '{word}' is '{plural}'.")
    for i, (verb, past) in enumerate(PAST_TENSE):
        if i % 4 == 3:
            add(
                "Give the past tense of the verb.", f"The past tense of '{verb}' is '{past}'.", verb
            )
        else:
            add(f"What is the past tense of '{verb}'?", f"The past tense of '{verb}' is '{past}'.")
    for word, best in SUPERLATIVES:
        add(
            f"What is the superlative form of '{word}'?",
            f"The superlative form of '{word}' is '{best}'.",
        )
    for i, (wrong, right) in enumerate(GRAMMAR):
        add(GRAMMAR_ASKS[i % len(GRAMMAR_ASKS)], right, wrong)
    for i, (wrong, right) in enumerate(SPELLING):
        ask = "Correct the spelling of the following word." if i % 2 else "Fix the misspelled word."
        add(ask, f"The correct spelling is '{right}'.", wrong)
    for active, passive in PASSIVE:
        add("Rewrite the sentence in the passive voice.", passive, active)
    for passive, active in ACTIVE:
        add("Rewrite the sentence in the active voice.", active, passive)
    for ask, inp, answer in TENSES:
        add(ask, answer, inp)
    for name, kind in ANIMALS:
        add(
            "Classify the animal as a mammal, bird, fish, reptile, amphibian or insect.",
            f"{article(name).capitalize()} {name.lower()} is {article(kind)} {kind}.",
            name,
        )
    for name, kind in PRODUCE:
        add(
            "Is the following a fruit or a vegetable?",
            f"{article(name).capitalize()} {name.lower()} is {article(kind)} {kind}.",
            name,
        )
    for text, label in SENTIMENT:
        add(
            "Classify the sentiment of the sentence as positive or negative.",
            f"The sentiment is {label}.",
            text,
        )
    for word, pos in PARTS_OF_SPEECH:
        add(
            f"Identify the part of speech of the word '{word}'.",
            f"'{word.capitalize()}' is {article(pos)} {pos}.",
        )
    for i, (country, capital) in enumerate(CAPITALS):
        if i % 3 == 2:
            add(
                "Name the capital of the following country.",
                f"The capital of {country} is {capital}.",
                country,
            )
        else:
            add(f"What is the capital of {country}?", f"The capital of {country} is {capital}.")
    for i, (element, symbol) in enumerate(ELEMENTS):
        if i % 2:
            add(
                f"What is the chemical symbol for {element}?",
                f"The chemical symbol for {element} is {symbol}.",
            )
        else:
            add(
                f"Which element has the chemical symbol {symbol}?",
                f"{symbol} is the chemical symbol for {element}.",
            )
    for question, answer in [*FACTS, *LISTS]:
        add(question, answer)

    # Computed answers, drawn with a fixed seed.
    for n in rng.sample(range(11, 200), 10):
        add(
            "Is the following number even or odd?",
            f"{n} is {'even' if n % 2 == 0 else 'odd'}.",
            str(n),
        )
    for n in rng.sample(range(11, 100), 12):
        verdict = "is a prime number" if is_prime(n) else "is not a prime number"
        add(f"Is {n} a prime number?", f"{n} {verdict}.")
    for _ in range(14):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        add(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")
    for _ in range(10):
        a, b = sorted(rng.sample(range(10, 200), 2), reverse=True)
        add(f"What is {a} minus {b}?", f"{a} minus {b} is {a - b}.")
    for _ in range(12):
        a, b = rng.randint(2, 12), rng.randint(2, 15)
        add(f"What is {a} times {b}?", f"{a} times {b} is {a * b}.")
    for _ in range(10):
        b, q = rng.randint(2, 12), rng.randint(2, 15)
        add(f"What is {b * q} divided by {b}?", f"{b * q} divided by {b} is {q}.")
    for _ in range(6):
        nums = [rng.randint(1, 50) for _ in range(3)]
        add(
            "Calculate the sum of the numbers.",
            f"The sum is {sum(nums)}.",
            f"{nums[0]}, {nums[1]} and {nums[2]}",
        )
    for _ in range(6):
        pct, base = rng.choice([10, 20, 25, 50]), rng.randint(2, 40) * 20
        add(f"What is {pct} percent of {base}?", f"{pct} percent of {base} is {pct * base // 100}.")
    for n in rng.sample(range(11, 26), 6):
        add(f"What is {n} squared?", f"{n} squared is {n * n}.")
    for i in range(24):
        big, small, factor = UNITS[i % len(UNITS)]
        x = rng.randint(2, 30)
        if i % 3 == 2:  # the other way round
            add(f"Convert {x * factor} {small} to {big}.", f"{x * factor} {small} is {x} {big}.")
        else:
            add(f"Convert {x} {big} to {small}.", f"{x} {big} is {x * factor} {small}.")
    for c in rng.sample(range(-4, 9), 6):
        celsius = c * 5
        fahrenheit = celsius * 9 // 5 + 32
        add(
            f"Convert {celsius} degrees Celsius to Fahrenheit.",
            f"{celsius} degrees Celsius is {fahrenheit} degrees Fahrenheit.",
        )
    for _ in range(8):
        words = rng.sample(WORDS, rng.randint(3, 5))
        add(
            "Sort the following words in alphabetical order.",
            ", ".join(sorted(words)),
            ", ".join(words),
        )
    for _ in range(6):
        nums = rng.sample(range(1, 100), 4)
        add(
            "Sort the numbers from smallest to largest.",
            ", ".join(map(str, sorted(nums))),
            ", ".join(map(str, nums)),
        )
    for sentence in SENTENCES:
        add(
            "How many words are in the following sentence?",
            f"The sentence has {len(sentence.split())} words.",
            sentence,
        )
    for word in rng.sample(WORDS, 8):
        add(
            f"How many letters are in the word '{word}'?",
            f"The word '{word}' has {len(word)} letters.",
        )

    # Drop repeats of the same question that the random draws may produce; keep the first.
    seen, records = set(), []
    for instruction, inp, output in out:
        if (instruction, inp) in seen:
            continue
        seen.add((instruction, inp))
        records.append({"instruction": instruction, "input": inp, "output": output})
    # Mix the categories so any slice (and the book's split) sees every kind of task.
    rng.shuffle(records)
    return records


def render() -> str:
    return json.dumps(build(random.Random(SEED)), indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="fail if --out is not up to date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run scripts/make_demo_data.py", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {len(json.loads(text))} records to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
