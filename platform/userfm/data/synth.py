"""Synthetic multi-service user logs with known answers (``userfm synth``).

Every user has a latent **persona**: a mixture ``theta`` over 12 interest topics, drawn from a
Dirichlet whose concentration is tilted by the user's age bracket. The same ``theta`` drives the
user's events on every service (shopping, search, news), which is exactly the signal the CLUE
contrastive model (arXiv 2111.11294) learns from: one user's shopping, search and news logs share
topics. Item text comes from hand-written per-topic vocabularies; products carry a 4-level category
path (as in ShopperBERT, arXiv 2106.00573) and a price.

Generative story, per user ``u``::

    age_u        ~ Categorical(AGE_PRIOR)
    theta_u      ~ Dirichlet(topic_concentration * AGE_TILT[age_u])            (12 topics)
    parent_u     ~ Bernoulli(sigmoid(PARENT_BIAS + PARENT_W . theta_u + PARENT_AGE[age_u]))
    segment_u    =  argmax theta_u
    services_u   =  one service (prob single_service_frac) or Dirichlet(service_concentration * pop)
    rate_u       ~  LogNormal(0, activity_sigma), rescaled to mean events_per_user over users
    n_history_u  =  max(1, Poisson(rate_u));  n_future_u = Poisson(rate_u * future_days / days)
    each event:  service ~ services_u; topic ~ theta_u (uniform with prob topic_noise);
                 item ~ Zipf within (service, topic); day ~ weekday rhythm; hour ~ hour-of-day rhythm
    observed label = true label, or with prob label_noise a uniformly random *other* class

The logs depend on the attributes only through ``theta``, so the Bayes-optimal predictor from
``theta`` (the **oracle**, reported in ``ground_truth.json``) is a ceiling for any model of the logs.

Output layout of :func:`generate` (``OUT`` = ``out_dir``)::

    OUT/events/part-00000.parquet ...         history [start, cutoff), EVENT_SCHEMA, sorted by user, ts
    OUT/future_events/part-00000.parquet ...  future window [cutoff, cutoff + future_days), same schema
    OUT/attributes.parquet                    user_id, age_bracket, is_parent, segment (observed, noisy)
    OUT/future_labels.parquet                 user_id, buy_<dept> per department, next_service, n_future_events
    OUT/latent.parquet                        the answer key: persona, noise-free labels, service mix, rate
    OUT/catalog.parquet                       every item with its service and topic
    OUT/ground_truth.json                     see :func:`generate`

Users are generated in chunks of ``users_per_file`` users, one part file per chunk and table, so
memory stays bounded by the chunk size; each chunk draws from its own seeded stream, so the output
depends only on the config (same config -> byte-identical files).
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from userfm.config import load_config, to_dict
from userfm.data.schema import CATEGORY_TYPE, EVENT_SCHEMA, SCHEMA_VERSION, TS_TYPE

# ---------------------------------------------------------------------------------------------
# Hand-written world: topics, vocabularies, taxonomies.
# ---------------------------------------------------------------------------------------------

# Each topic owns one shopping department (category level 1) and one news section. The product
# taxonomy is level 2 -> level 3 -> [level 4 leaves]; a leaf doubles as the product noun in titles.
_TOPIC_SPECS: tuple[dict[str, Any], ...] = (
    dict(
        name="sports", department="Sports", section="Sports", price=60.0,
        brands=["Trailpeak", "Strideon", "Goalline", "Velomax", "Summitra"],
        adjectives=["lightweight", "pro", "waterproof", "breathable", "competition", "all-weather"],
        sizes=["size 40", "size 42", "size 44", "size 46", "size S", "size M", "size L"],
        taxonomy={
            "Running": {"Shoes": ["Trail shoes", "Road shoes", "Racing spikes"],
                        "Apparel": ["Running shorts", "Running jackets", "Compression socks"]},
            "Cycling": {"Bikes": ["Road bikes", "Mountain bikes"],
                        "Gear": ["Cycling helmets", "Bike lights", "Cycling gloves"]},
            "Team sports": {"Football": ["Footballs", "Football boots", "Shin guards"],
                            "Basketball": ["Basketballs", "Basketball shoes"]},
        },
        terms=["trail shoes", "running shoes", "marathon training plan", "road bike", "mountain bike",
               "football boots", "cycling helmet", "basketball", "running shorts", "bike lights",
               "10k race", "sports watch"],
        howto=["how to run faster", "how to fix a bike chain", "marathon pace calculator",
               "football scores today", "how to start running"],
        subjects=["Local marathon", "City football club", "Olympic sprinter", "Veteran tennis star",
                  "Youth cycling team", "National rugby side", "Underdog basketball squad",
                  "Mountain trail race"],
        predicates=["draws record crowd", "stuns favourites in final", "names new head coach",
                    "sets new national record", "faces tough season ahead", "celebrates historic win",
                    "returns after injury break", "unveils ambitious training plans"],
    ),
    dict(
        name="cooking", department="Kitchen", section="Food", price=45.0,
        brands=["Copperleaf", "Saltwell", "Chefora", "Hearthline", "Panbury"],
        adjectives=["nonstick", "cast-iron", "stainless", "ceramic", "professional", "compact"],
        sizes=["20 cm", "24 cm", "28 cm", "1 L", "2 L", "5 L", "set of 3"],
        taxonomy={
            "Cookware": {"Pans": ["Frying pans", "Woks", "Griddle pans"],
                         "Pots": ["Stock pots", "Dutch ovens", "Saucepans"]},
            "Appliances": {"Small appliances": ["Blenders", "Stand mixers", "Air fryers"],
                           "Coffee": ["Espresso machines", "Coffee grinders"]},
            "Tools": {"Knives": ["Chef knives", "Knife sets"],
                      "Baking": ["Baking trays", "Cake tins", "Mixing bowls"]},
        },
        terms=["sourdough bread", "air fryer", "cast iron pan", "chef knife", "pasta recipe",
               "stand mixer", "espresso machine", "dutch oven", "vegan curry", "banana bread",
               "knife sharpener", "meal prep"],
        howto=["how to season cast iron", "easy dinner recipes", "how to make sourdough starter",
               "how long to boil an egg", "best pizza dough recipe"],
        subjects=["Neighbourhood bakery", "Celebrity chef", "Street food market", "Family-run trattoria",
                  "Award-winning sommelier", "New vegan cafe", "Regional cheese maker",
                  "Seaside seafood shack"],
        predicates=["wins national culinary award", "reveals secret family recipe", "opens second location",
                    "sparks debate over prices", "draws long queues at launch", "goes fully plant-based",
                    "celebrates fifty years", "earns first Michelin star"],
    ),
    dict(
        name="tech", department="Electronics", section="Technology", price=180.0,
        brands=["Voltiq", "Nexacore", "Pixelon", "Quantabyte", "Lumitek"],
        adjectives=["wireless", "4K", "ultra-slim", "smart", "noise-cancelling", "portable"],
        sizes=["64 GB", "128 GB", "256 GB", "512 GB", "1 TB", "13 inch", "15 inch"],
        taxonomy={
            "Computers": {"Laptops": ["Ultrabooks", "Workstation laptops", "Chromebooks"],
                          "Accessories": ["Keyboards", "Computer mice", "USB hubs"]},
            "Phones": {"Smartphones": ["Android phones", "Flagship phones"],
                       "Phone accessories": ["Phone cases", "Chargers", "Power banks"]},
            "Audio": {"Headphones": ["Earbuds", "Over-ear headphones"],
                      "Speakers": ["Smart speakers", "Bluetooth speakers"]},
        },
        terms=["laptop", "wireless earbuds", "smartphone", "usb-c charger", "mechanical keyboard",
               "power bank", "bluetooth speaker", "phone case", "noise cancelling headphones",
               "smart speaker", "4k monitor", "external ssd"],
        howto=["how to speed up laptop", "best phone this year", "how to reset router", "laptop vs tablet",
               "how to back up phone"],
        subjects=["Local startup", "Chip maker", "Smartphone giant", "Open-source project",
                  "Cybersecurity firm", "University robotics lab", "Cloud provider",
                  "Electric scooter company"],
        predicates=["unveils new flagship device", "raises fresh funding round", "faces privacy investigation",
                    "announces major layoffs", "launches AI assistant", "reports record quarterly sales",
                    "recalls faulty batteries", "opens research centre downtown"],
    ),
    dict(
        name="fashion", department="Fashion", section="Style", price=55.0,
        brands=["Maison Verre", "Urbanloom", "Silkroad", "Noirette", "Threadly"],
        adjectives=["slim-fit", "oversized", "linen", "vintage", "cropped", "classic"],
        sizes=["size XS", "size S", "size M", "size L", "size XL", "size 38", "size 40"],
        taxonomy={
            "Women": {"Dresses": ["Maxi dresses", "Summer dresses", "Evening gowns"],
                      "Bags": ["Tote bags", "Crossbody bags"]},
            "Men": {"Tops": ["Linen shirts", "Polo shirts", "Crew neck tees"],
                    "Outerwear": ["Trench coats", "Denim jackets"]},
            "Accessories": {"Jewelry": ["Necklaces", "Earrings", "Rings"],
                            "Footwear": ["Ankle boots", "Loafers", "Sneakers"]},
        },
        terms=["maxi dress", "linen shirt", "trench coat", "white sneakers", "tote bag", "gold necklace",
               "denim jacket", "ankle boots", "summer outfit", "wedding guest dress", "vintage jeans",
               "minimalist wardrobe"],
        howto=["what to wear to a wedding", "how to style a blazer", "fashion trends this season",
               "how to measure ring size", "capsule wardrobe ideas"],
        subjects=["Paris fashion week", "Emerging designer", "Luxury label", "Vintage boutique",
                  "High street retailer", "Sustainable clothing brand", "Celebrity stylist", "Local tailor"],
        predicates=["stuns with bold new collection", "bets on recycled fabrics", "opens flagship store",
                    "announces surprise collaboration", "revives nineties trend", "cuts prices ahead of summer",
                    "wins young designer prize", "draws crowds at pop-up"],
    ),
    dict(
        name="travel", department="Travel", section="Travel", price=70.0,
        brands=["Wanderlite", "Jetvale", "Nomadic", "Passage", "Aerolux"],
        adjectives=["carry-on", "expandable", "hard-shell", "packable", "anti-theft", "ultralight"],
        sizes=["20 L", "35 L", "55 cm", "65 cm", "75 cm", "one size"],
        taxonomy={
            "Luggage": {"Suitcases": ["Carry-on suitcases", "Checked suitcases"],
                        "Backpacks": ["Travel backpacks", "Daypacks"]},
            "Travel accessories": {"Comfort": ["Neck pillows", "Eye masks"],
                                   "Organisation": ["Packing cubes", "Passport holders", "Toiletry bags"]},
            "Outdoor": {"Camping": ["Tents", "Sleeping bags"],
                        "Essentials": ["Travel adapters", "Luggage scales"]},
        },
        terms=["cheap flights", "carry-on suitcase", "beach resort", "city break", "travel insurance",
               "packing cubes", "hostel", "train tickets", "road trip", "travel adapter",
               "visa requirements", "all inclusive holiday"],
        howto=["how to pack light", "best time to visit japan", "flights to lisbon", "things to do in rome",
               "how to get airport lounge access"],
        subjects=["Regional airport", "Budget airline", "Historic old town", "Island resort",
                  "Night train service", "National park", "Cruise operator", "Mountain village"],
        predicates=["welcomes record summer tourists", "adds new direct routes", "tightens visitor rules",
                    "reopens after renovation", "tops best destinations list", "struggles with overtourism",
                    "launches off-season discounts", "celebrates heritage status"],
    ),
    dict(
        name="music", department="Music", section="Music", price=90.0,
        brands=["Harmonix", "Tonewood", "Beatcraft", "Resona", "Vinylux"],
        adjectives=["acoustic", "electric", "studio", "vintage", "compact", "professional"],
        sizes=["6-string", "4-string", "49-key", "61-key", "88-key", "12-inch", "7-inch"],
        taxonomy={
            "Instruments": {"Guitars": ["Acoustic guitars", "Electric guitars", "Bass guitars"],
                            "Keys": ["Digital pianos", "MIDI keyboards"]},
            "Recording": {"Studio": ["Microphones", "Audio interfaces", "Studio monitors"],
                          "DJ": ["DJ controllers", "Turntables"]},
            "Media": {"Vinyl": ["LP records", "Box sets"],
                      "Accessories": ["Guitar strings", "Guitar picks", "Instrument cables"]},
        },
        terms=["acoustic guitar", "concert tickets", "vinyl records", "guitar chords", "midi keyboard",
               "turntable", "studio microphone", "music festival", "piano lessons", "new album",
               "guitar strings", "audio interface"],
        howto=["how to tune a guitar", "learn piano online", "festival lineup", "how to record vocals at home",
               "best albums this year"],
        subjects=["Indie rock band", "City symphony orchestra", "Chart-topping singer", "Local jazz club",
                  "Summer music festival", "Veteran rapper", "Teenage piano prodigy", "Record label"],
        predicates=["announces farewell tour", "sells out stadium in minutes", "releases surprise album",
                    "wins top music prize", "cancels shows over illness", "returns with first single in years",
                    "headlines sold-out festival", "celebrates anniversary with free concert"],
    ),
    dict(
        name="gaming", department="Games", section="Gaming", price=80.0,
        brands=["Pixelforge", "Arcadia", "Joyvolt", "Questor", "Nebulon"],
        adjectives=["RGB", "wireless", "ergonomic", "limited edition", "pro", "deluxe"],
        sizes=["1 TB", "2 TB", "standard edition", "deluxe edition", "144 Hz", "240 Hz"],
        taxonomy={
            "Consoles": {"Home consoles": ["Console bundles", "Handheld consoles"],
                         "Controllers": ["Gamepads", "Racing wheels"]},
            "PC gaming": {"Peripherals": ["Gaming mice", "Gaming keyboards", "Gaming headsets"],
                          "Components": ["Graphics cards", "Gaming monitors"]},
            "Games": {"Video games": ["Action games", "Role-playing games", "Sports games"],
                      "Tabletop": ["Board games", "Card games"]},
        },
        terms=["gaming headset", "graphics card", "new rpg", "console bundle", "gaming chair", "board games",
               "esports tournament", "gaming mouse", "walkthrough", "patch notes", "handheld console",
               "co-op games"],
        howto=["how to build a gaming pc", "best open world games", "boss fight walkthrough",
               "how to stream on twitch", "game release dates"],
        subjects=["Indie game studio", "Esports team", "Console maker", "Blockbuster franchise",
                  "Retro arcade", "Game streaming star", "Board game cafe", "Mobile game developer"],
        predicates=["delays long-awaited sequel", "wins world championship", "cuts console prices",
                    "breaks concurrent player record", "faces backlash over microtransactions",
                    "reveals new trailer", "opens in city centre", "signs record sponsorship deal"],
    ),
    dict(
        name="gardening", department="Garden", section="Home & Garden", price=35.0,
        brands=["Greenthumb", "Bloomfield", "Rootwise", "Mossgate", "Fernhill"],
        adjectives=["organic", "heavy-duty", "cordless", "weatherproof", "self-watering", "ceramic"],
        sizes=["5 L", "10 L", "20 L", "40 L", "pack of 10", "30 cm"],
        taxonomy={
            "Plants": {"Seeds": ["Vegetable seeds", "Flower seeds", "Herb seeds"],
                       "Bulbs": ["Tulip bulbs", "Dahlia tubers"]},
            "Tools": {"Hand tools": ["Pruning shears", "Trowels", "Garden gloves"],
                      "Power tools": ["Lawn mowers", "Hedge trimmers"]},
            "Outdoor living": {"Planters": ["Raised beds", "Plant pots"],
                               "Watering": ["Garden hoses", "Watering cans", "Sprinklers"]},
        },
        terms=["tomato seeds", "raised bed", "lawn mower", "compost bin", "pruning shears", "tulip bulbs",
               "garden hose", "indoor plants", "herb garden", "hedge trimmer", "organic fertiliser",
               "greenhouse"],
        howto=["when to plant tomatoes", "how to get rid of slugs", "how to prune roses", "how to make compost",
               "best plants for shade"],
        subjects=["Community garden", "Botanical garden", "Allotment society", "Rare orchid collector",
                  "Local flower show", "Urban farm", "Heritage rose nursery", "School vegetable patch"],
        predicates=["blooms early after mild winter", "wins regional gardening prize", "battles invasive pest",
                    "opens to public for first time", "seeks volunteers for spring", "records bumper harvest",
                    "unveils new glasshouse", "fights plan for new housing"],
    ),
    dict(
        name="finance", department="Office", section="Business", price=40.0,
        brands=["Ledgerly", "Coinvault", "Fiscalis", "Tallyworks", "Sterling & Co"],
        adjectives=["fireproof", "compact", "solar-powered", "leather", "digital", "executive"],
        sizes=["A4", "A5", "12-digit", "10-digit", "20 L", "pack of 5"],
        taxonomy={
            "Office supplies": {"Paper": ["Notebooks", "Ledgers", "Planners"],
                                "Desk": ["Desk organisers", "Fountain pens"]},
            "Office electronics": {"Calculators": ["Financial calculators", "Scientific calculators"],
                                   "Machines": ["Paper shredders", "Label makers"]},
            "Security": {"Safes": ["Fireproof safes", "Cash boxes"],
                         "Wallets": ["RFID wallets", "Card holders", "Money clips"]},
        },
        terms=["index funds", "mortgage rates", "savings account", "stock market today", "budget planner",
               "crypto prices", "pension calculator", "credit score", "dividend stocks", "tax return", "etf",
               "inflation rate"],
        howto=["how to invest for beginners", "how to pay off debt", "how to improve credit score",
               "best high interest savings", "how to file taxes"],
        subjects=["Central bank", "Regional lender", "Tech stock rally", "Pension fund", "Fintech app",
                  "Housing market", "Small business owners", "Global markets"],
        predicates=["holds interest rates steady", "warns of slowing growth", "posts record profits",
                    "faces regulator scrutiny", "cuts fees for savers", "rebounds after volatile week",
                    "braces for higher costs", "attracts new investors"],
    ),
    dict(
        name="pets", department="Pets", section="Pets & Animals", price=30.0,
        brands=["Pawsome", "Furbury", "Whiskerly", "Barkwell", "Petvana"],
        adjectives=["grain-free", "orthopedic", "chew-proof", "reflective", "automatic", "organic"],
        sizes=["2 kg", "5 kg", "12 kg", "small", "medium", "large", "pack of 24"],
        taxonomy={
            "Dogs": {"Dog food": ["Dry dog food", "Wet dog food", "Dog treats"],
                     "Dog gear": ["Dog leashes", "Dog beds", "Dog harnesses"]},
            "Cats": {"Cat food": ["Dry cat food", "Cat treats"],
                     "Cat care": ["Cat litter", "Scratching posts", "Cat toys"]},
            "Small pets": {"Aquatics": ["Fish tanks", "Aquarium filters"],
                           "Birds": ["Bird cages", "Bird seed"]},
        },
        terms=["puppy training", "grain free dog food", "cat litter", "dog bed", "cat scratching post",
               "vet near me", "dog harness", "aquarium", "dog grooming", "kitten food", "bird cage",
               "pet insurance"],
        howto=["how to house train a puppy", "why does my cat scratch furniture", "how much to feed a dog",
               "how to introduce two cats", "best dog breeds for families"],
        subjects=["Animal shelter", "Rescued greyhound", "Local vet clinic", "Therapy dog", "Dog show champion",
                  "Wildlife sanctuary", "Lost cat", "Pet food maker"],
        predicates=["finds homes for record number of pets", "wins hearts online", "warns of summer heat risks",
                    "opens free clinic for strays", "reunites with owner after months", "celebrates tenth birthday",
                    "issues product recall", "calls for new adopters"],
    ),
    dict(
        name="books", department="Books", section="Books & Culture", price=18.0,
        brands=["Inkwell Press", "Pagebright", "Quillstone", "Folio House", "Brightleaf"],
        adjectives=["hardcover", "paperback", "illustrated", "signed", "collector's", "pocket"],
        sizes=["1st edition", "2nd edition", "box set", "vol. 1", "vol. 2", "large print"],
        taxonomy={
            "Fiction": {"Novels": ["Crime novels", "Literary fiction", "Romance novels"],
                        "Speculative": ["Science fiction", "Fantasy"]},
            "Non-fiction": {"Biography": ["Memoirs", "Biographies"],
                            "Learning": ["History books", "Popular science", "Self-help books"]},
            "Reading accessories": {"E-readers": ["E-ink readers", "E-reader covers"],
                                    "Book care": ["Bookmarks", "Book lights", "Bookends"]},
        },
        terms=["bestseller list", "fantasy series", "crime novel", "e-reader", "book club picks", "audiobook",
               "sci-fi books", "memoir", "poetry collection", "book light", "classic novels",
               "library near me"],
        howto=["books like harry potter", "how to read more", "best books of the year", "how to write a novel",
               "summer reading list"],
        subjects=["Debut novelist", "Local bookshop", "Literary prize jury", "Bestselling crime author",
                  "Public library", "Poetry festival", "Independent publisher", "Fantasy saga"],
        predicates=["tops bestseller charts", "shortlisted for major prize", "announces screen adaptation",
                    "saved by community campaign", "unveils long-awaited sequel", "draws record visitors",
                    "faces criticism over ending", "celebrates centenary"],
    ),
    dict(
        name="fitness", department="Fitness", section="Health", price=50.0,
        brands=["Ironpulse", "Flexora", "Corestrong", "Zenfit", "Liftlab"],
        adjectives=["adjustable", "non-slip", "high-density", "smart", "foldable", "heavy-duty"],
        sizes=["1 kg", "5 kg", "10 kg", "20 kg", "6 mm", "10 mm", "set of 5"],
        taxonomy={
            "Strength": {"Weights": ["Dumbbells", "Kettlebells", "Barbells"],
                         "Bodyweight": ["Resistance bands", "Pull-up bars"]},
            "Cardio": {"Machines": ["Treadmills", "Exercise bikes", "Rowing machines"],
                       "Cardio accessories": ["Skipping ropes", "Mini trampolines"]},
            "Wellness": {"Yoga": ["Yoga mats", "Yoga blocks"],
                         "Nutrition": ["Protein powder", "Energy bars", "Shaker bottles"]},
        },
        terms=["home workout", "protein powder", "yoga mat", "kettlebell workout", "gym membership",
               "hiit routine", "resistance bands", "treadmill", "calorie calculator", "pilates class",
               "creatine", "fitness tracker"],
        howto=["how to lose belly fat", "how many calories to burn", "beginner gym routine",
               "how to do a pull up", "stretching exercises for back pain"],
        subjects=["Local gym chain", "Fitness influencer", "Yoga instructor", "Health ministry",
                  "Community bootcamp", "Celebrity trainer", "Wearable maker", "Olympic weightlifter"],
        predicates=["launches free outdoor classes", "sparks viral workout trend", "urges adults to move more",
                    "opens round-the-clock studio", "shares simple daily routine", "warns against fad diets",
                    "partners with local schools", "hits one million followers"],
    ),
)

TOPICS: tuple[str, ...] = tuple(t["name"] for t in _TOPIC_SPECS)
DEPARTMENTS: tuple[str, ...] = tuple(t["department"] for t in _TOPIC_SPECS)  # category level 1, one per topic
NEWS_SECTIONS: tuple[str, ...] = tuple(t["section"] for t in _TOPIC_SPECS)
KNOWN_SERVICES: tuple[str, ...] = ("shopping", "search", "news")

_QUERY_TEMPLATES = ("{t}", "best {t}", "cheap {t}", "{t} review", "{t} near me", "{t} for beginners",
                    "{t} deals", "top rated {t}")
_HEADLINE_SUFFIXES = ("", " this week", " after months of speculation", " as interest surges")

# --- attribute model (the known answers) ---------------------------------------------------------
AGE_BRACKETS: tuple[str, ...] = ("18-24", "25-34", "35-54", "55+")
AGE_PRIOR = np.array([0.2, 0.3, 0.3, 0.2])
# Multiplier on the Dirichlet concentration of each topic, per age bracket (rows follow AGE_BRACKETS,
# columns follow TOPICS). A tiny concentration makes a topic nearly absent, so age leaves a footprint
# in behaviour that a model can pick up, but not a deterministic one.
#                     spo  coo  tec  fas  tra  mus  gam  gar  fin  pet  boo  fit
AGE_TILT = np.array([[1.5, 0.5, 1.5, 2.0, 1.0, 2.5, 3.0, 0.2, 0.3, 0.7, 0.7, 1.5],
                     [1.2, 1.0, 1.5, 1.5, 1.5, 1.2, 1.2, 0.5, 1.0, 1.0, 0.8, 1.8],
                     [1.0, 1.8, 1.0, 0.8, 1.2, 0.7, 0.5, 1.5, 1.5, 1.2, 1.0, 1.0],
                     [0.6, 1.8, 0.5, 0.6, 1.5, 0.6, 0.2, 3.0, 1.8, 1.2, 2.0, 0.5]])
# is_parent ~ Bernoulli(sigmoid(PARENT_BIAS + PARENT_W . theta + PARENT_AGE[age])).
PARENT_BIAS = -0.3
PARENT_W = np.array([0.0, 3.5, -0.5, -1.5, -2.0, -1.5, -2.0, 3.0, 1.0, 2.0, 0.5, -0.5])
PARENT_AGE = np.array([-2.5, 0.0, 1.0, -0.5])

# --- service model ---------------------------------------------------------------------------------
SERVICE_POPULARITY = {"shopping": 0.4, "search": 0.35, "news": 0.25}  # share of users / events


def _bumps(*peaks: tuple[float, float, float], base: float) -> np.ndarray:
    """24 hour-of-day weights: ``base`` plus circular Gaussian bumps ``(hour, width_h, height)``."""
    h = np.arange(24.0)
    w = np.full(24, base)
    for mu, sd, amp in peaks:
        d = np.minimum(np.abs(h - mu), 24 - np.abs(h - mu))
        w += amp * np.exp(-0.5 * (d / sd) ** 2)
    return w / w.sum()


# Hour-of-day (UTC) and weekday (Mon..Sun) rhythms, normalised to probabilities.
HOUR_PROFILE = {
    "shopping": _bumps((12.5, 1.5, 0.5), (20.5, 2.0, 1.0), base=0.05),
    "search": _bumps((10.0, 2.5, 0.7), (15.0, 2.5, 0.6), (21.0, 2.0, 0.6), base=0.05),
    "news": _bumps((7.5, 1.2, 1.0), (12.5, 1.2, 0.6), (19.0, 2.0, 0.5), base=0.05),
}
_WEEKDAY = {
    "shopping": [0.9, 0.9, 0.9, 1.0, 1.1, 1.5, 1.4],
    "search": [1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.9],
    "news": [1.2, 1.1, 1.1, 1.1, 1.0, 0.7, 0.8],
}
WEEKDAY_PROFILE = {s: np.array(w) / np.sum(w) for s, w in _WEEKDAY.items()}

# --- latent mode: structure that a bag of words does not expose --------------------------------------
MODES = ("latent", "topics")
# segment (latent mode) = a lifestyle: when in the day the user is active, on every service alike.
LIFESTYLES: tuple[str, ...] = ("early_bird", "commuter", "lunch_break", "evening", "night_owl", "all_day")
LIFESTYLE_HOURS = {
    "early_bird": _bumps((6.5, 1.0, 1.0), base=0.02),
    "commuter": _bumps((8.0, 0.8, 1.0), (18.0, 0.8, 1.0), base=0.02),
    "lunch_break": _bumps((12.5, 0.8, 1.0), base=0.02),
    "evening": _bumps((20.5, 1.0, 1.0), base=0.02),
    "night_owl": _bumps((1.5, 1.2, 1.0), base=0.02),
    "all_day": _bumps((9.0, 3.0, 0.3), (15.0, 3.0, 0.3), (21.0, 3.0, 0.3), base=0.02),
}
# Topic persistence (probability an event stays on the previous event's topic) ~ Beta with this mean
# per age bracket (young users hop between interests, older ones stay): an order-only signal, since the
# stationary topic mix of the chain is still theta.
PERSIST_MEAN = np.array([0.1, 0.35, 0.6, 0.85])
PERSIST_CONC = 12.0
# Routine (parents: weekend-heavy, re-buying the same items) ~ Beta with this mean for (non-parent, parent).
ROUTINE_MEAN = np.array([0.15, 0.6])
ROUTINE_CONC = 8.0
ROUTINE_WEEKEND = 0.6  # share of a routine=1 user's events moved onto weekend days
ROUTINE_REPEAT = 0.6  # probability a routine=1 user's event repeats their previous item on that service
# Taste (item identity): every user has a taste class in 0..3, equal to their age bracket with prob
# TASTE_MATCH and uniform otherwise (so P(taste = age) = TASTE_MATCH + (1 - TASTE_MATCH) / 4). With prob
# item_signal a shopping or news event takes a uniformly drawn item of its topic from the user's taste set.
# An item's taste class is a function of two words that are never adjacent in its title, (brand + size)
# mod 4 for products (first 4 brands x first 4 sizes; other products belong to no taste set) and
# (subject + suffix) mod 4 for headlines, chosen so that every unigram and every bigram occurs equally
# often in each class's set: the set is visible to a model of whole items (or of item co-occurrence),
# not to a bag of words or bigrams.
TASTE_CLASSES = 4
TASTE_MATCH = 0.6
TASTE_SERVICES = ("shopping", "news")

_US_PER_DAY = 86_400_000_000
_US_PER_HOUR = 3_600_000_000


@dataclass(frozen=True)
class SynthConfig:
    """Config of :func:`generate`; YAML keys in ``experiments/synth/*.yaml`` are these field names."""

    n_users: int = 2000  # users
    events_per_user: float = 30.0  # mean history events per user (heavy-tailed, every user has >= 1)
    start: str = "2024-01-01"  # ISO date (UTC midnight) where the history period begins
    days: int = 180  # history period length in days; cutoff = start + days
    future_days: int = 30  # length in days of the future window [cutoff, cutoff + future_days)
    label_noise: float = 0.1  # probability an observed attribute is a uniformly random other class
    services: tuple[str, ...] = ("shopping", "search", "news")  # any non-empty subset of KNOWN_SERVICES
    seed: int = 0  # master seed; every random stream derives from it
    users_per_file: int = 50_000  # users per chunk = per Parquet part file (bounds memory)
    activity_sigma: float = 1.4  # lognormal sigma (log-scale sd) of per-user activity; larger = heavier tail
    max_events_per_user: int = 5000  # cap on a user's expected history events (keeps chunks bounded)
    topic_concentration: float = 0.3  # Dirichlet concentration per topic before the age tilt; small = focused users
    topic_noise: float = 0.1  # probability an event's topic is uniform instead of drawn from the persona
    single_service_frac: float = 0.3  # fraction of users active on one service only
    service_concentration: float = 2.0  # Dirichlet concentration (x popularity) of multi-service users' mix
    products_per_topic: int = 400  # products in the catalog per topic
    queries_per_topic: int = 150  # distinct search queries per topic (capped by the vocabulary)
    articles_per_topic: int = 200  # news articles per topic (capped by the vocabulary)
    item_zipf: float = 1.0  # Zipf exponent of item popularity within a topic (0 = uniform)
    # Which generative story (module docstring). "latent" (default): attributes live mostly in when,
    # in what order and how repetitively users act, on every service alike; words carry a weak share.
    # "topics": the original story, where the attributes act only through the topic (= word) mix, so a
    # bag of words is nearly the sufficient statistic.
    mode: str = "latent"
    word_signal: float = 0.3  # latent: attribute -> topic link in [0, 1] (exponent on the age tilt, scale on parent weights; 1 = topics mode)
    time_signal: float = 0.7  # latent: probability an event's hour follows the user's lifestyle (= segment) profile rather than the service's
    order_signal: float = 1.0  # latent: in [0, 1], spread of the age brackets' topic-persistence means around their average (0 = no order signal)
    routine_signal: float = 1.0  # latent: in [0, 1], spread of parents' vs non-parents' routine means (weekend share, repeat purchases)
    item_signal: float = 0.5  # latent: probability a shopping/news event's item comes from the user's taste set (taste ~ age; 0 = off)

    def __post_init__(self) -> None:
        if self.n_users < 1:
            raise ValueError(f"n_users must be >= 1, got {self.n_users}")
        if not self.events_per_user > 0:
            raise ValueError(f"events_per_user must be > 0, got {self.events_per_user}")
        if self.days < 1 or self.future_days < 0:
            raise ValueError(f"days must be >= 1 and future_days >= 0, got {self.days}, {self.future_days}")
        # Below 0.5 the noisy label stays most likely equal to the true one for every class count, so
        # the Bayes-optimal predictor of the observed label is the one of the true label.
        if not 0.0 <= self.label_noise < 0.5:
            raise ValueError(f"label_noise must be in [0, 0.5), got {self.label_noise}")
        if not self.services or len(set(self.services)) != len(self.services):
            raise ValueError(f"services must be a non-empty list without repeats, got {self.services}")
        unknown = [s for s in self.services if s not in KNOWN_SERVICES]
        if unknown:
            raise ValueError(f"unknown service(s) {unknown}; known: {list(KNOWN_SERVICES)}")
        _parse_start(self.start)
        for name in ("users_per_file", "max_events_per_user", "products_per_topic", "queries_per_topic",
                     "articles_per_topic"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("topic_noise", "single_service_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.activity_sigma < 0 or self.topic_concentration <= 0 or self.service_concentration <= 0:
            raise ValueError("activity_sigma must be >= 0; topic_concentration, service_concentration > 0")
        if self.item_zipf < 0:
            raise ValueError(f"item_zipf must be >= 0, got {self.item_zipf}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        for name in ("word_signal", "time_signal", "order_signal", "routine_signal", "item_signal"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")


def _parse_start(start: str) -> dt.datetime:
    try:
        d = dt.date.fromisoformat(str(start))
    except ValueError as exc:
        raise ValueError(f"start must be an ISO date like 2024-01-01, got {start!r}") from exc
    return dt.datetime(d.year, d.month, d.day, tzinfo=dt.timezone.utc)


def _rng(cfg: SynthConfig, *key: int) -> np.random.Generator:
    """An independent stream per purpose: (0,) catalog, (1,) users, (2, chunk) events of a chunk."""
    return np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=key))


# ---------------------------------------------------------------------------------------------
# Catalog: every item of every (service, topic), built once; events only sample indices into it.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Catalog:
    table: pa.Table  # service, topic, text, item_id, category, value; one row per item
    offset: np.ndarray  # (n_services,) first row of each service's block
    size: np.ndarray  # (n_services,) items per topic within each service's block (topic-major)
    zipf_cdf: tuple[np.ndarray, ...]  # per service: (size,) popularity CDF over a topic's items
    taste: np.ndarray  # (n_items,) taste class of each item, -1 = in no taste set (every search query)

    def taste_rows(self, s: int, topic: int, taste: int) -> np.ndarray:
        """Catalog rows of service ``s``'s items of ``topic`` whose taste class is ``taste``."""
        lo = self.offset[s] + topic * self.size[s]
        return lo + np.nonzero(self.taste[lo:lo + self.size[s]] == taste)[0]


def _products(spec: dict, rng: np.random.Generator, n: int,
              taste_grid: bool = False) -> list[tuple[str, list[str], float, int]]:
    """``n`` products of a topic: (title, category path, price, taste class or -1).

    Without ``taste_grid``: random (brand, adjective, leaf, size) combinations, no taste sets. With it:
    about half the products are whole grids, for a few (adjective, leaf) templates, of the first
    TASTE_CLASSES brands x first TASTE_CLASSES sizes, taste = (brand + size) mod TASTE_CLASSES, so each taste
    set holds every brand, size, adjective and leaf (and every bigram) equally often; the rest are random
    combinations outside that brand x size block (taste -1). The order is shuffled: popularity ranks are random.
    """
    leaves = [(l2, l3, l4) for l2, sub in spec["taxonomy"].items() for l3, l4s in sub.items() for l4 in l4s]
    # Per-leaf base price around the topic's typical price, then per-product jitter.
    leaf_price = spec["price"] * rng.lognormal(0.0, 0.6, len(leaves))
    nb, na, nl, ns = len(spec["brands"]), len(spec["adjectives"]), len(leaves), len(spec["sizes"])
    k = TASTE_CLASSES
    if taste_grid and nb >= k and ns >= k:
        n_t = min(n // (2 * k * k), na * nl)  # templates
        tpl = np.repeat(rng.choice(na * nl, size=n_t, replace=False), k * k)
        cell = np.tile(np.arange(k * k), n_t)
        gb, gs = np.divmod(cell, k)
        free = np.array([(bb, ss) for bb in range(nb) for ss in range(ns) if not (bb < k and ss < k)])
        f = rng.choice(na * nl * len(free), size=n - n_t * k * k, replace=n - n_t * k * k > na * nl * len(free))
        ftpl, fcell = np.divmod(f, len(free))
        order = rng.permutation(n)
        b = np.r_[gb, free[fcell, 0]][order]
        s = np.r_[gs, free[fcell, 1]][order]
        a, leaf = np.divmod(np.r_[tpl, ftpl][order], nl)
        taste = np.r_[(gb + gs) % k, np.full(len(f), -1)][order]
    else:
        combos = rng.choice(nb * na * nl * ns, size=n, replace=n > nb * na * nl * ns)
        b, rest = np.divmod(combos, na * nl * ns)
        a, rest = np.divmod(rest, nl * ns)
        leaf, s = np.divmod(rest, ns)
        taste = np.full(n, -1)
    jitter = rng.lognormal(0.0, 0.25, n)
    out = []
    for i in range(n):
        l2, l3, l4 = leaves[leaf[i]]
        title = f"{spec['brands'][b[i]]} {spec['adjectives'][a[i]]} {l4.lower()} {spec['sizes'][s[i]]}"
        price = max(float(np.round(leaf_price[leaf[i]] * jitter[i])) - 0.01, 0.99)
        out.append((title, [spec["department"], l2, l3, l4], round(price, 2), int(taste[i])))
    return out


def _query_pool(spec: dict) -> list[str]:
    """Every distinct query of a topic: templated terms, how-to questions, brand + product noun."""
    leaves = [l4.lower() for sub in spec["taxonomy"].values() for l4s in sub.values() for l4 in l4s]
    pool = [tpl.format(t=t) for tpl in _QUERY_TEMPLATES for t in spec["terms"]]
    pool += list(spec["howto"])
    pool += [f"{brand.lower()} {leaf}" for brand in spec["brands"] for leaf in leaves]
    return sorted(set(pool))


def _headline_pool(spec: dict) -> list[str]:
    return [f"{s} {p}{x}" for s in spec["subjects"] for p in spec["predicates"] for x in _HEADLINE_SUFFIXES]


def _headlines(spec: dict, rng: np.random.Generator, m: int, taste_grid: bool) -> tuple[list[str], np.ndarray]:
    """``m`` headlines of a topic and their taste classes (-1 = none).

    Without ``taste_grid``: a random subset of the pool, no taste sets. With it: every subject x suffix
    headline of as many whole predicates as fit in ``m`` (taste = (subject + suffix) mod TASTE_CLASSES, so
    each taste set holds every subject, predicate and suffix equally often), then random others (taste -1),
    in shuffled order.
    """
    pool = _headline_pool(spec)
    n_pred, n_suf = len(spec["predicates"]), len(_HEADLINE_SUFFIXES)
    if not taste_grid or len(spec["subjects"]) % TASTE_CLASSES or n_suf % TASTE_CLASSES:
        return [pool[i] for i in rng.permutation(len(pool))[:m]], np.full(m, -1)
    subject, rest = np.divmod(np.arange(len(pool)), n_pred * n_suf)
    predicate, suffix = np.divmod(rest, n_suf)
    whole = rng.permutation(n_pred)[:min(m // (len(spec["subjects"]) * n_suf), n_pred)]
    in_grid = np.isin(predicate, whole)
    pick = np.r_[np.nonzero(in_grid)[0], rng.permutation(np.nonzero(~in_grid)[0])[:m - int(in_grid.sum())]]
    pick = pick[rng.permutation(len(pick))]
    taste = np.where(in_grid, (subject + suffix) % TASTE_CLASSES, -1)
    return [pool[i] for i in pick], taste[pick]


def _catalog_size(cfg: SynthConfig, service: str) -> int:
    """Items per topic of ``service``: the configured count, capped by the smallest vocabulary.

    Every topic of a service gets the same number of items so an item's row is just
    ``offset + topic * size + rank``.
    """
    if service == "shopping":
        return cfg.products_per_topic
    if service == "search":
        return min(cfg.queries_per_topic, min(len(_query_pool(t)) for t in _TOPIC_SPECS))
    return min(cfg.articles_per_topic, min(len(_headline_pool(t)) for t in _TOPIC_SPECS))


def _build_catalog(cfg: SynthConfig) -> _Catalog:
    rng = _rng(cfg, 0)
    service, topic, text, item_id, category, value, taste = [], [], [], [], [], [], []
    offset, size, cdfs = [], [], []
    grid = cfg.mode == "latent" and cfg.item_signal > 0  # taste sets only where they are drawn from
    for svc in cfg.services:
        m = _catalog_size(cfg, svc)
        offset.append(len(text))
        size.append(m)
        # Popularity rank r has weight (r + 1) ** -item_zipf; the catalog order is already random.
        w = np.arange(1, m + 1, dtype=np.float64) ** -cfg.item_zipf
        cdf = np.cumsum(w / w.sum())
        cdf[-1] = 1.0
        cdfs.append(cdf)
        for k, spec in enumerate(_TOPIC_SPECS):
            start_row = len(text)
            if svc == "shopping":
                for j, (title, cat, price, t) in enumerate(_products(spec, rng, m, grid)):
                    taste.append(t)
                    text.append(title)
                    category.append(cat)
                    value.append(price)
                    item_id.append(f"p{k:02d}{j:05d}")
            elif svc == "search":
                pool = _query_pool(spec)
                text.extend(pool[i] for i in rng.permutation(len(pool))[:m])
                taste.extend([-1] * m)
                category.extend([None] * m)
                value.extend([None] * m)
                item_id.extend([None] * m)
            else:
                heads, tastes = _headlines(spec, rng, m, grid)
                text.extend(heads)
                taste.extend(tastes.tolist())
                category.extend([["News", spec["section"]]] * m)
                value.extend([None] * m)
                item_id.extend(f"n{k:02d}{j:05d}" for j in range(m))
            service.extend([svc] * (len(text) - start_row))
            topic.extend([spec["name"]] * (len(text) - start_row))
    table = pa.table(
        {
            "service": pa.array(service, pa.string()),
            "topic": pa.array(topic, pa.string()),
            "text": pa.array(text, pa.string()),
            "item_id": pa.array(item_id, pa.string()),
            "category": pa.array(category, CATEGORY_TYPE),
            "value": pa.array(value, pa.float64()),
            "taste": pa.array(taste, pa.int8()),
        }
    )
    return _Catalog(table, np.array(offset, np.int64), np.array(size, np.int64), tuple(cdfs),
                    np.array(taste, np.int64))


# ---------------------------------------------------------------------------------------------
# Users: persona, attributes, service mix, activity. Global (n_users x 12 floats), cheap.
# ---------------------------------------------------------------------------------------------


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _noisy(rng: np.random.Generator, y: np.ndarray, k: int, eps: float) -> np.ndarray:
    """Replace each label, with probability ``eps``, by a uniformly random *other* class of ``k``."""
    flip = rng.random(y.shape[0]) < eps
    shift = rng.integers(1, k, y.shape[0])
    return np.where(flip, (y + shift) % k, y)


def _age_alpha(topic_concentration: float, word_signal: float = 1.0) -> np.ndarray:
    """Dirichlet parameters of the persona per age bracket, (n_ages, n_topics)."""
    return topic_concentration * AGE_TILT ** word_signal


def _log_dirichlet(persona: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """log Dirichlet(persona | alpha[k]) for every user and row k of ``alpha``: (n_users, n_rows)."""
    log_norm = np.array([math.lgamma(a.sum()) - sum(math.lgamma(x) for x in a) for a in alpha])
    log_theta = np.log(np.clip(persona, 1e-300, None))
    return log_theta @ (alpha - 1.0).T + log_norm


def _log_beta(x: np.ndarray, mean: np.ndarray, conc: float) -> np.ndarray:
    """log Beta(x | mean[k] * conc, (1 - mean[k]) * conc) for every x and k: (len(x), len(mean))."""
    a, b = mean * conc, (1.0 - mean) * conc
    norm = np.array([math.lgamma(aa + bb) - math.lgamma(aa) - math.lgamma(bb) for aa, bb in zip(a, b)])
    x = np.clip(x, 1e-12, 1 - 1e-12)[:, None]
    return (a - 1) * np.log(x) + (b - 1) * np.log1p(-x) + norm


def _normalize_log(loglik: np.ndarray) -> np.ndarray:
    loglik = loglik - loglik.max(axis=-1, keepdims=True)
    p = np.exp(loglik)
    return p / p.sum(axis=-1, keepdims=True)


def age_posterior(persona: np.ndarray, topic_concentration: float, word_signal: float = 1.0) -> np.ndarray:
    """P(age bracket | persona) under the topics-mode model, shape (n_users, len(AGE_BRACKETS)).

    Args:
        persona: (n_users, n_topics) topic mixtures (rows sum to 1).
        topic_concentration: ``SynthConfig.topic_concentration``.
        word_signal: exponent on the age tilt (1 in topics mode).
    """
    loglik = _log_dirichlet(persona, _age_alpha(topic_concentration, word_signal)) + np.log(AGE_PRIOR)
    return _normalize_log(loglik)


def _parent_given_age(persona: np.ndarray, word_signal: float = 1.0) -> np.ndarray:
    """P(is_parent | persona, age) for every age bracket: (n_users, n_ages)."""
    return _sigmoid(PARENT_BIAS + word_signal * (persona @ PARENT_W)[:, None] + PARENT_AGE[None, :])


def parent_posterior(persona: np.ndarray, topic_concentration: float) -> np.ndarray:
    """P(is_parent | persona), shape (n_users,): the age-conditional logistic marginalised over age."""
    p_age = age_posterior(persona, topic_concentration)
    return (p_age * _parent_given_age(persona)).sum(axis=1)


def persist_mean(cfg: "SynthConfig") -> np.ndarray:
    """Mean topic persistence per age bracket (latent mode): PERSIST_MEAN pulled to its average by order_signal."""
    avg = float(PERSIST_MEAN.mean())
    return avg + cfg.order_signal * (PERSIST_MEAN - avg)


def routine_mean(cfg: "SynthConfig") -> np.ndarray:
    """Mean routine of (non-parents, parents) (latent mode), pulled to their average by routine_signal."""
    avg = float(ROUTINE_MEAN.mean())
    return avg + cfg.routine_signal * (ROUTINE_MEAN - avg)


def taste_given_age() -> np.ndarray:
    """P(taste | age bracket), (n_ages, TASTE_CLASSES): TASTE_MATCH on the diagonal plus uniform."""
    return TASTE_MATCH * np.eye(len(AGE_BRACKETS), TASTE_CLASSES) + (1 - TASTE_MATCH) / TASTE_CLASSES


def latent_posteriors(cfg: "SynthConfig", persona: np.ndarray, persist: np.ndarray,
                      routine: np.ndarray, taste: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Latent mode: (P(age | latents) (n, n_ages), P(parent | latents) (n,)) for a model that knows every
    latent the logs are drawn from (persona, topic persistence, routine, taste), by exact enumeration of the
    joint P(age, parent | latents) ∝ P(age) Dir(persona | age) Beta(persist | age) P(taste | age)
    P(parent | persona, age) Beta(routine | parent). A channel whose signal is 0 leaves no trace in the
    logs and is left out."""
    log_age = np.log(AGE_PRIOR) + _log_dirichlet(persona, _age_alpha(cfg.topic_concentration, cfg.word_signal))
    if cfg.order_signal > 0:
        log_age = log_age + _log_beta(persist, persist_mean(cfg), PERSIST_CONC)
    if cfg.item_signal > 0 and taste is not None:
        log_age = log_age + np.log(taste_given_age()).T[taste]
    pa_ = _parent_given_age(persona, cfg.word_signal)  # (n, n_ages)
    log_routine = _log_beta(routine, routine_mean(cfg), ROUTINE_CONC) if cfg.routine_signal > 0 else np.zeros((len(routine), 2))
    # joint (n, n_ages, 2): parent = 0 / 1
    joint = log_age[:, :, None] + np.stack([np.log1p(-pa_), np.log(pa_)], axis=2) + log_routine[:, None, :]
    flat = _normalize_log(joint.reshape(len(persona), -1)).reshape(joint.shape)
    return flat.sum(axis=2), flat[:, :, 1].sum(axis=1)


@dataclass(frozen=True)
class _Users:
    user_id: pa.Array  # (n,) strings "u0000001"...
    persona: np.ndarray  # (n, n_topics)
    true: dict[str, np.ndarray]  # attribute -> (n,) int class index, noise-free
    observed: dict[str, np.ndarray]  # attribute -> (n,) int class index, after label noise
    service_w: np.ndarray  # (n, n_services) service mix, rows sum to 1
    rate: np.ndarray  # (n,) expected history events
    n_hist: np.ndarray  # (n,) history events
    n_fut: np.ndarray  # (n,) future-window events
    lifestyle: np.ndarray | None = None  # latent mode: (n,) index into LIFESTYLES (= the true segment)
    persist: np.ndarray | None = None  # latent mode: (n,) topic persistence in [0, 1]
    routine: np.ndarray | None = None  # latent mode: (n,) routine in [0, 1]
    taste: np.ndarray | None = None  # latent mode with item_signal > 0: (n,) taste class in 0..TASTE_CLASSES-1


ATTRIBUTE_CLASSES: dict[str, tuple] = {"age_bracket": AGE_BRACKETS, "is_parent": (False, True), "segment": TOPICS}


def attribute_classes(cfg: "SynthConfig") -> dict[str, tuple]:
    """Class names of each attribute; the segment is a topic (topics mode) or a lifestyle (latent mode)."""
    return {**ATTRIBUTE_CLASSES, "segment": TOPICS if cfg.mode == "topics" else LIFESTYLES}


def _make_users(cfg: SynthConfig) -> _Users:
    rng = _rng(cfg, 1)
    n, n_topics = cfg.n_users, len(TOPICS)
    width = max(7, len(str(n)))
    user_id = pa.array([f"u{i:0{width}d}" for i in range(1, n + 1)], pa.string())

    latent = cfg.mode == "latent"
    ws = cfg.word_signal if latent else 1.0
    age = rng.choice(len(AGE_BRACKETS), size=n, p=AGE_PRIOR)
    g = rng.standard_gamma(_age_alpha(cfg.topic_concentration, ws)[age])  # (n, n_topics) -> Dirichlet rows
    persona = g / g.sum(axis=1, keepdims=True)
    bad = ~np.isfinite(persona).all(axis=1)  # all gammas underflowed to 0 (vanishingly rare)
    persona[bad] = 1.0 / n_topics
    parent = rng.random(n) < _sigmoid(PARENT_BIAS + ws * (persona @ PARENT_W) + PARENT_AGE[age])
    lifestyle = persist = routine = None
    if latent:
        lifestyle = rng.integers(0, len(LIFESTYLES), n)
        m = persist_mean(cfg)[age]
        persist = rng.beta(m * PERSIST_CONC, (1 - m) * PERSIST_CONC)
        m = routine_mean(cfg)[parent.astype(np.int64)]
        routine = rng.beta(m * ROUTINE_CONC, (1 - m) * ROUTINE_CONC)
    segment = lifestyle if latent else persona.argmax(axis=1)
    true = {"age_bracket": age, "is_parent": parent.astype(np.int64), "segment": segment}
    classes = attribute_classes(cfg)
    observed = {k: _noisy(rng, v, len(classes[k]), cfg.label_noise) for k, v in true.items()}

    n_svc = len(cfg.services)
    pop = np.array([SERVICE_POPULARITY[s] for s in cfg.services])
    pop /= pop.sum()
    service_w = rng.standard_gamma(cfg.service_concentration * np.broadcast_to(pop, (n, n_svc)))
    service_w /= np.clip(service_w.sum(axis=1, keepdims=True), 1e-300, None)
    single = rng.random(n) < cfg.single_service_frac
    only = rng.choice(n_svc, size=n, p=pop)
    service_w[single] = np.eye(n_svc)[only[single]]
    service_w[~np.isfinite(service_w).all(axis=1)] = pop

    # Heavy-tailed activity: lognormal, rescaled so these users' mean rate is exactly events_per_user
    # (a heavy tail makes the sample mean of a few thousand users wander ~5% otherwise).
    x = rng.lognormal(0.0, cfg.activity_sigma, n)
    rate = np.minimum(cfg.events_per_user * x / x.mean(), cfg.max_events_per_user)
    n_hist = np.maximum(rng.poisson(rate), 1)
    n_fut = rng.poisson(rate * cfg.future_days / cfg.days)
    taste = None
    if latent and cfg.item_signal > 0:  # drawn last, so item_signal = 0 leaves every other draw as it was
        taste = _sample_rows(rng, np.arange(n), taste_given_age()[age])
    return _Users(user_id, persona, true, observed, service_w, rate, n_hist, n_fut, lifestyle, persist, routine,
                  taste)


# ---------------------------------------------------------------------------------------------
# Events: vectorised per chunk of users.
# ---------------------------------------------------------------------------------------------


def _sample_rows(rng: np.random.Generator, row: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per event from its user's row of ``probs`` (n_rows, k), no (n_events, k) array.

    Rows' CDFs are laid end to end, each shifted by its row index, so a single ``searchsorted`` of
    ``row + u`` over the flat, non-decreasing array finds every draw at once.
    """
    k = probs.shape[1]
    cdf = np.cumsum(probs, axis=1)
    cdf[:, -1] = 1.0
    flat = (cdf + np.arange(probs.shape[0])[:, None]).ravel()
    idx = np.searchsorted(flat, row + rng.random(row.shape[0]), side="right") - row * k
    return np.minimum(idx, k - 1)


def _service_day_hour(rng: np.random.Generator, cnt: int, name: str, weekday: np.ndarray,
                      n_days: int) -> tuple[np.ndarray, np.ndarray]:
    """Day index in [0, n_days) and hour of ``cnt`` events of service ``name`` from its weekday and hour rhythm."""
    day_cdf = np.cumsum(WEEKDAY_PROFILE[name][weekday])
    day = np.minimum(np.searchsorted(day_cdf / day_cdf[-1], rng.random(cnt), side="right"), n_days - 1)
    hour = np.minimum(np.searchsorted(np.cumsum(HOUR_PROFILE[name]), rng.random(cnt), side="right"), 23)
    return day, hour


def _event_times(rng: np.random.Generator, svc: np.ndarray, services: tuple[str, ...], t0_us: int,
                 first_weekday: int, n_days: int) -> np.ndarray:
    """Microsecond UTC timestamps in [t0, t0 + n_days) with each service's weekday and hour rhythm."""
    ts = np.empty(svc.shape[0], np.int64)
    weekday = (first_weekday + np.arange(n_days)) % 7
    for s, name in enumerate(services):
        m = svc == s
        cnt = int(m.sum())
        if cnt == 0:
            continue
        day, hour = _service_day_hour(rng, cnt, name, weekday, n_days)
        ts[m] = t0_us + day * _US_PER_DAY + hour * _US_PER_HOUR + rng.integers(0, _US_PER_HOUR, cnt)
    return ts


def _latent_times(cfg: SynthConfig, users: _Users, lo: int, row: np.ndarray, svc: np.ndarray,
                  rng: np.random.Generator, t0_us: int, first_weekday: int, n_days: int) -> np.ndarray:
    """Latent mode timestamps: the service's rhythm, except that with probability ``time_signal`` the hour
    follows the user's lifestyle, and with probability ``ROUTINE_WEEKEND * routine`` the day is a
    uniformly drawn weekend day of the window."""
    n = row.shape[0]
    weekday = (first_weekday + np.arange(n_days)) % 7
    day, hour = np.zeros(n, np.int64), np.zeros(n, np.int64)
    for s, name in enumerate(cfg.services):
        m = svc == s
        day[m], hour[m] = _service_day_hour(rng, int(m.sum()), name, weekday, n_days)
    life = users.lifestyle[lo:][row]
    by_life = rng.random(n) < cfg.time_signal
    for k, name in enumerate(LIFESTYLES):
        m = by_life & (life == k)
        hour[m] = np.minimum(np.searchsorted(np.cumsum(LIFESTYLE_HOURS[name]), rng.random(int(m.sum())), side="right"), 23)
    weekend = np.nonzero(weekday >= 5)[0]
    moved = rng.random(n) < ROUTINE_WEEKEND * users.routine[lo:][row]
    if weekend.size:
        day[moved] = rng.choice(weekend, int(moved.sum()))
    return t0_us + day * _US_PER_DAY + hour * _US_PER_HOUR + rng.integers(0, _US_PER_HOUR, n)


def _forward_fill(keep: np.ndarray) -> np.ndarray:
    """Index of the last position <= i where ``keep`` is True (``keep[0]`` must be True)."""
    return np.maximum.accumulate(np.where(keep, np.arange(keep.shape[0]), 0))


def _draw_items(cfg: SynthConfig, cat: _Catalog, svc: np.ndarray, topic: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Catalog row of each event: Zipf-popular item of its (service, topic)."""
    item = np.empty(svc.shape[0], np.int64)
    for s in range(len(cfg.services)):
        m = svc == s
        rank = np.searchsorted(cat.zipf_cdf[s], rng.random(int(m.sum())), side="right")
        item[m] = cat.offset[s] + topic[m] * cat.size[s] + np.minimum(rank, cat.size[s] - 1)
    return item


def _draw_taste_items(cfg: SynthConfig, cat: _Catalog, taste: np.ndarray, svc: np.ndarray, topic: np.ndarray,
                      item: np.ndarray, rng: np.random.Generator) -> None:
    """With prob ``item_signal``, replace a shopping/news event's item (in place) by a uniformly drawn item
    of its topic from the user's taste set (``taste``: (n_events,) the user's taste class)."""
    hit = rng.random(svc.shape[0]) < cfg.item_signal
    u = rng.random(svc.shape[0])
    hit &= np.isin(svc, [s for s, name in enumerate(cfg.services) if name in TASTE_SERVICES])
    ev = np.nonzero(hit)[0]
    key = (svc[ev] * len(TOPICS) + topic[ev]) * TASTE_CLASSES + taste[ev]  # (service, topic, taste) of each draw
    for g in np.unique(key):
        m = ev[key == g]
        st, c = divmod(int(g), TASTE_CLASSES)
        rows = cat.taste_rows(*divmod(st, len(TOPICS)), c)
        if rows.size:
            item[m] = rows[np.minimum((u[m] * rows.size).astype(np.int64), rows.size - 1)]


def _event_table(cfg: SynthConfig, cat: _Catalog, users: _Users, lo: int, hi: int, row: np.ndarray,
                 svc: np.ndarray, item: np.ndarray, ts: np.ndarray) -> pa.Table:
    items = cat.table.take(pa.array(item))
    return pa.Table.from_arrays(
        [
            users.user_id.slice(lo, hi - lo).take(pa.array(row)),
            pa.array(ts, TS_TYPE),
            pa.array(cfg.services, pa.string()).take(pa.array(svc)),
            items.column("text").combine_chunks(),
            items.column("item_id").combine_chunks(),
            items.column("category").combine_chunks(),
            items.column("value").combine_chunks(),
        ],
        schema=EVENT_SCHEMA,
    )


def _events(cfg: SynthConfig, cat: _Catalog, users: _Users, lo: int, counts: np.ndarray,
            rng: np.random.Generator, t0_us: int, first_weekday: int, n_days: int):
    """Events of users ``lo .. lo + len(counts)``; returns (EVENT_SCHEMA table, local user, service, topic)."""
    hi = lo + counts.shape[0]
    row = np.repeat(np.arange(counts.shape[0]), counts)  # (n_events,) user index within the chunk
    svc = _sample_rows(rng, row, users.service_w[lo:hi])
    if cfg.mode == "latent":
        return _latent_events(cfg, cat, users, lo, hi, row, svc, rng, t0_us, first_weekday, n_days)
    topic = _sample_rows(rng, row, users.persona[lo:hi])
    noise = rng.random(row.shape[0]) < cfg.topic_noise
    topic[noise] = rng.integers(0, len(TOPICS), int(noise.sum()))
    item = _draw_items(cfg, cat, svc, topic, rng)
    ts = _event_times(rng, svc, cfg.services, t0_us, first_weekday, n_days) if n_days > 0 else item * 0

    order = np.lexsort((ts, row))  # by user, then time
    row, svc, topic, item, ts = row[order], svc[order], topic[order], item[order], ts[order]
    return _event_table(cfg, cat, users, lo, hi, row, svc, item, ts), row, svc, topic


def _latent_events(cfg: SynthConfig, cat: _Catalog, users: _Users, lo: int, hi: int, row: np.ndarray,
                   svc: np.ndarray, rng: np.random.Generator, t0_us: int, first_weekday: int, n_days: int):
    """Latent mode: times first (lifestyle hours, routine weekends), then, in time order, a topic chain that
    stays on the previous event's topic with the user's persistence (else draws from the persona), items
    from the topics, and repeats: with probability ``ROUTINE_REPEAT * routine`` an event takes the item of
    the user's previous event on the same service."""
    n = row.shape[0]
    ts = _latent_times(cfg, users, lo, row, svc, rng, t0_us, first_weekday, n_days) if n_days > 0 else np.zeros(n, np.int64)
    order = np.lexsort((ts, row))  # by user, then time
    row, svc, ts = row[order], svc[order], ts[order]
    fresh = _sample_rows(rng, row, users.persona[lo:hi])
    noise = rng.random(n) < cfg.topic_noise
    fresh[noise] = rng.integers(0, len(TOPICS), int(noise.sum()))
    first = np.r_[True, row[1:] != row[:-1]] if n else np.zeros(0, bool)
    stay = (rng.random(n) < users.persist[lo:hi][row]) & ~first
    topic = fresh[_forward_fill(~stay)] if n else fresh
    item = _draw_items(cfg, cat, svc, topic, rng)
    if users.taste is not None:
        _draw_taste_items(cfg, cat, users.taste[lo:hi][row], svc, topic, item, rng)
    repeat = rng.random(n) < ROUTINE_REPEAT * users.routine[lo:hi][row]
    by_svc = np.lexsort((np.arange(n), svc, row))  # (user, service), time order kept within
    r, s = row[by_svc], svc[by_svc]
    opens = np.r_[True, (r[1:] != r[:-1]) | (s[1:] != s[:-1])] if n else np.zeros(0, bool)
    src = by_svc[_forward_fill(~(repeat[by_svc] & ~opens))] if n else by_svc
    item[by_svc], topic[by_svc] = item[src], topic[src]
    return _event_table(cfg, cat, users, lo, hi, row, svc, item, ts), row, svc, topic


def _future_labels(cfg: SynthConfig, users: _Users, lo: int, n: int, row: np.ndarray, svc: np.ndarray,
                   topic: np.ndarray) -> pa.Table:
    """Behaviour labels from the future window: buy_<dept>, next_service, n_future_events."""
    cols: dict[str, pa.Array] = {"user_id": users.user_id.slice(lo, n)}
    bought = np.zeros((n, len(DEPARTMENTS)), bool)
    if "shopping" in cfg.services:
        shop = svc == cfg.services.index("shopping")
        bought[row[shop], topic[shop]] = True
    for d, dept in enumerate(DEPARTMENTS):
        cols[f"buy_{dept.lower()}"] = pa.array(bought[:, d])
    n_fut = np.bincount(row, minlength=n)
    has = n_fut > 0
    nxt = np.zeros(n, np.int64)
    nxt[has] = svc[(np.cumsum(n_fut) - n_fut)[has]]  # rows are sorted by user, then time: first = next
    cols["next_service"] = pa.array(cfg.services, pa.string()).take(pa.array(nxt, mask=~has))
    cols["n_future_events"] = pa.array(n_fut.astype(np.int64))
    return pa.table(cols)


def _periods(cfg: SynthConfig) -> tuple[dt.datetime, dt.datetime, dt.datetime]:
    start = _parse_start(cfg.start)
    cutoff = start + dt.timedelta(days=cfg.days)
    return start, cutoff, cutoff + dt.timedelta(days=cfg.future_days)


def _iter_chunks(cfg: SynthConfig, cat: _Catalog, users: _Users) -> Iterator[tuple]:
    """Per chunk of ``users_per_file`` users: (events, future_events, future_labels, per-service counts
    of events, of future events)."""
    start, cutoff, _ = _periods(cfg)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    t0, t1 = ((t - epoch) // dt.timedelta(microseconds=1) for t in (start, cutoff))
    n_svc = len(cfg.services)
    for c, lo in enumerate(range(0, cfg.n_users, cfg.users_per_file)):
        hi = min(lo + cfg.users_per_file, cfg.n_users)
        rng = _rng(cfg, 2, c)
        hist, _, hsvc, _ = _events(cfg, cat, users, lo, users.n_hist[lo:hi], rng, t0, start.weekday(), cfg.days)
        fut, row, fsvc, topic = _events(cfg, cat, users, lo, users.n_fut[lo:hi], rng, t1, cutoff.weekday(),
                                        cfg.future_days)
        labels = _future_labels(cfg, users, lo, hi - lo, row, fsvc, topic)
        yield hist, fut, labels, np.bincount(hsvc, minlength=n_svc), np.bincount(fsvc, minlength=n_svc)


# ---------------------------------------------------------------------------------------------
# Tables and ground truth.
# ---------------------------------------------------------------------------------------------


def _attribute_tables(cfg: SynthConfig, users: _Users) -> tuple[pa.Table, pa.Table]:
    """(attributes = observed noisy labels, latent = persona and noise-free labels)."""

    segments = np.array(attribute_classes(cfg)["segment"], dtype=object)

    def labels(y: dict[str, np.ndarray]) -> dict[str, pa.Array]:
        return {
            "age_bracket": pa.array(np.array(AGE_BRACKETS, dtype=object)[y["age_bracket"]], pa.string()),
            "is_parent": pa.array(y["is_parent"].astype(bool)),
            "segment": pa.array(segments[y["segment"]], pa.string()),
        }

    attributes = pa.table({"user_id": users.user_id, **labels(users.observed)})
    n_topics, n_svc = len(TOPICS), len(cfg.services)
    latent = pa.table(
        {
            "user_id": users.user_id,
            **labels(users.true),
            "persona": pa.FixedSizeListArray.from_arrays(pa.array(users.persona.ravel()), n_topics),
            "service_mix": pa.FixedSizeListArray.from_arrays(pa.array(users.service_w.ravel()), n_svc),
            "activity_rate": pa.array(users.rate),
            "n_events": pa.array(users.n_hist.astype(np.int64)),
            "n_future_events": pa.array(users.n_fut.astype(np.int64)),
        }
    )
    if cfg.mode == "latent":
        latent = latent.append_column("topic_persistence", pa.array(users.persist)).append_column(
            "routine", pa.array(users.routine))
        if users.taste is not None:
            latent = latent.append_column("taste", pa.array(users.taste.astype(np.int64)))
    return attributes, latent


def _oracle(cfg: SynthConfig, users: _Users) -> dict[str, dict[str, Any]]:
    """Per attribute: class priors, and accuracy of the Bayes-optimal predictor that knows the persona."""
    eps = cfg.label_noise
    if cfg.mode == "latent":
        p_age, p1 = latent_posteriors(cfg, users.persona, users.persist, users.routine, users.taste)
        n_life = len(LIFESTYLES)
        # hours reveal the lifestyle given enough events when time_signal > 0; else nothing does
        p_seg = np.eye(n_life)[users.lifestyle] if cfg.time_signal > 0 else np.full((cfg.n_users, n_life), 1 / n_life)
        post = {"age_bracket": p_age, "is_parent": np.stack([1.0 - p1, p1], axis=1), "segment": p_seg}
        pm, rm = persist_mean(cfg), routine_mean(cfg)
        model = {
            "age_bracket": {"prior": AGE_PRIOR.tolist(),
                            "dirichlet_alpha": _age_alpha(cfg.topic_concentration, cfg.word_signal).tolist(),
                            "persistence_beta_mean": pm.tolist(), "persistence_beta_concentration": PERSIST_CONC,
                            "taste_given_age": taste_given_age().tolist(), "item_signal": cfg.item_signal,
                            "rule": "theta ~ Dirichlet(dirichlet_alpha[age]); persistence ~ Beta(mean[age], conc); "
                                    "each event keeps the previous event's topic with prob persistence; "
                                    "taste ~ taste_given_age[age]; a shopping/news event takes a uniform item of "
                                    "its topic from the taste set (catalog column taste) with prob item_signal"},
            "is_parent": {"bias": PARENT_BIAS, "topic_weights": (cfg.word_signal * PARENT_W).tolist(),
                          "age_effect": PARENT_AGE.tolist(), "routine_beta_mean": rm.tolist(),
                          "routine_beta_concentration": ROUTINE_CONC, "routine_weekend": ROUTINE_WEEKEND,
                          "routine_repeat": ROUTINE_REPEAT,
                          "rule": "P(parent) = sigmoid(bias + topic_weights . theta + age_effect[age]); routine ~ "
                                  "Beta(mean[parent], conc); an event falls on a weekend day with prob "
                                  "routine_weekend * routine and repeats the user's previous item on that service "
                                  "with prob routine_repeat * routine"},
            "segment": {"rule": "segment = lifestyle ~ Uniform; an event's hour follows the lifestyle's hour "
                                "profile with prob time_signal, else the service's",
                        "hour_profiles": {k: v.tolist() for k, v in LIFESTYLE_HOURS.items()}},
        }
    else:
        p1 = parent_posterior(users.persona, cfg.topic_concentration)
        post = {
            "age_bracket": age_posterior(users.persona, cfg.topic_concentration),
            "is_parent": np.stack([1.0 - p1, p1], axis=1),
            "segment": np.eye(len(TOPICS))[users.persona.argmax(axis=1)],  # segment is a function of persona
        }
        model = {
            "age_bracket": {"prior": AGE_PRIOR.tolist(), "dirichlet_alpha": (cfg.topic_concentration * AGE_TILT).tolist(),
                            "rule": "theta ~ Dirichlet(dirichlet_alpha[age])"},
            "is_parent": {"bias": PARENT_BIAS, "topic_weights": PARENT_W.tolist(), "age_effect": PARENT_AGE.tolist(),
                          "rule": "P(parent) = sigmoid(bias + topic_weights . theta + age_effect[age])"},
            "segment": {"rule": "segment = argmax theta"},
        }
    out = {}
    for name, classes in attribute_classes(cfg).items():
        k = len(classes)
        p = post[name]  # (n, k) P(true class | persona)
        pred = p.argmax(axis=1)
        p_pred = p[np.arange(p.shape[0]), pred]
        obs, true = users.observed[name], users.true[name]
        out[name] = {
            "classes": list(classes),
            "num_classes": k,
            "prior": (np.bincount(true, minlength=k) / len(true)).tolist(),
            "observed_prior": (np.bincount(obs, minlength=k) / len(obs)).tolist(),
            "majority_accuracy": float(np.bincount(obs, minlength=k).max() / len(obs)),
            "oracle_accuracy": float(np.mean(pred == obs)),
            "oracle_accuracy_noise_free": float(np.mean(pred == true)),
            # E[accuracy against noisy labels | persona], averaged over users: no sampling noise of labels.
            "oracle_accuracy_expected": float(np.mean((1 - eps) * p_pred + eps / (k - 1) * (1 - p_pred))),
            "observed_noise_rate": float(np.mean(obs != true)),
            "model": model[name],
        }
    return out


def _ground_truth(cfg: SynthConfig, cat: _Catalog, users: _Users, svc_counts: dict, fut_svc_counts: dict,
                  label_rates: dict) -> dict[str, Any]:
    start, cutoff, end = _periods(cfg)
    n = users.n_hist
    return {
        "generator": "userfm.synth",
        "schema_version": SCHEMA_VERSION,
        "seed": cfg.seed,
        "config": to_dict(cfg),
        "period": {"start": start.isoformat(), "cutoff": cutoff.isoformat(), "end": end.isoformat(),
                   "history_days": cfg.days, "future_days": cfg.future_days},
        "topics": [{"name": t["name"], "department": t["department"], "news_section": t["section"]}
                   for t in _TOPIC_SPECS],
        "services": list(cfg.services),
        "label_noise": cfg.label_noise,
        "mode": cfg.mode,
        # where each attribute's signal lives (latent mode), so a reader knows which model should see it
        "channels": ({"age_bracket": ["topic mix (word_signal)", "topic persistence = event order (order_signal)",
                                      "taste set = item identity, not words (item_signal)"],
                      "is_parent": ["topic mix (word_signal)", "weekend share + repeated items (routine_signal)"],
                      "segment": ["hour of day on every service (time_signal)"]}
                     if cfg.mode == "latent" else
                     {"age_bracket": ["topic mix"], "is_parent": ["topic mix"], "segment": ["topic mix (argmax)"]}),
        "attributes": _oracle(cfg, users),
        "activity": {
            "n_users": cfg.n_users,
            "n_events": int(n.sum()),
            "n_future_events": int(users.n_fut.sum()),
            "mean_events_per_user": float(n.mean()),
            "median_events_per_user": float(np.median(n)),
            "max_events_per_user": int(n.max()),
            "frac_users_le_5_events": float(np.mean(n <= 5)),
            "frac_users_ge_100_events": float(np.mean(n >= 100)),
            "frac_single_service_users": float(np.mean(users.service_w.max(axis=1) == 1.0)),
            "events_per_service": svc_counts,
            "future_events_per_service": fut_svc_counts,
        },
        "future_labels": {"positive_rate": label_rates},
        "catalog": {"items_per_service": {s: int(cat.size[i]) * len(TOPICS) for i, s in enumerate(cfg.services)}},
        "rhythm": {"hour_of_day_utc": {s: HOUR_PROFILE[s].tolist() for s in cfg.services},
                   "weekday_mon_first": {s: WEEKDAY_PROFILE[s].tolist() for s in cfg.services}},
    }


def _run(cfg: SynthConfig, sink: Callable[[int, pa.Table, pa.Table], None],
         progress: Callable[[str], None] | None) -> tuple[dict[str, pa.Table], dict[str, Any]]:
    """Generate everything; hand each chunk's (events, future_events) to ``sink``; return the
    user-level tables and the ground truth."""
    say = progress or (lambda _msg: None)
    cat = _build_catalog(cfg)
    users = _make_users(cfg)
    say(f"catalog {cat.table.num_rows} items; {cfg.n_users} users, {int(users.n_hist.sum())} history events")
    svc_counts = np.zeros(len(cfg.services), np.int64)
    fut_counts = np.zeros(len(cfg.services), np.int64)
    labels = []
    n_chunks = -(-cfg.n_users // cfg.users_per_file)
    for c, (hist, fut, lab, h_cnt, f_cnt) in enumerate(_iter_chunks(cfg, cat, users)):
        svc_counts += h_cnt
        fut_counts += f_cnt
        labels.append(lab)
        sink(c, hist, fut)
        say(f"chunk {c + 1}/{n_chunks}: {hist.num_rows} events, {fut.num_rows} future events")
    svc_counts = dict(zip(cfg.services, svc_counts.tolist()))
    fut_counts = dict(zip(cfg.services, fut_counts.tolist()))
    future_labels = pa.concat_tables(labels)
    rates = {name: float(np.mean(future_labels.column(name).to_numpy(zero_copy_only=False)))
             for name in future_labels.column_names if name.startswith("buy_")}
    rates["has_future_event"] = float(np.mean(users.n_fut > 0))
    attributes, latent = _attribute_tables(cfg, users)
    gt = _ground_truth(cfg, cat, users, svc_counts, fut_counts, rates)
    small = {"attributes": attributes, "future_labels": future_labels, "latent": latent, "catalog": cat.table}
    return small, gt


def generate_tables(cfg: SynthConfig) -> dict[str, Any]:
    """Generate the whole dataset in memory (for tests and small experiments).

    Returns a dict with the tables ``events``, ``future_events`` (EVENT_SCHEMA), ``attributes``,
    ``future_labels``, ``latent``, ``catalog`` (``pa.Table``), and ``ground_truth`` (the dict that
    :func:`generate` writes as ``ground_truth.json``, without its ``files`` entry). The tables are
    identical to the concatenation of the files :func:`generate` writes for the same config.
    """
    hist, fut = [], []
    small, gt = _run(cfg, lambda _c, h, f: (hist.append(h), fut.append(f)), None)
    return {"events": pa.concat_tables(hist), "future_events": pa.concat_tables(fut), **small, "ground_truth": gt}


def generate(cfg: SynthConfig, out_dir: str | Path, progress: Callable[[str], None] | None = None) -> dict:
    """Write the dataset under ``out_dir``, return the ground-truth dict (also ``ground_truth.json``).

    Ground-truth keys: ``generator``, ``schema_version``, ``seed``, ``config``, ``period`` (start, cutoff,
    end, history_days, future_days), ``topics`` (name, department, news_section), ``services``,
    ``label_noise``, ``attributes`` (per attribute: classes, num_classes, prior, observed_prior,
    majority_accuracy, oracle_accuracy, oracle_accuracy_noise_free, oracle_accuracy_expected,
    observed_noise_rate, model), ``activity`` (n_users, n_events, n_future_events, mean/median/max events
    per user, frac_users_le_5_events, frac_users_ge_100_events, frac_single_service_users,
    events_per_service, future_events_per_service), ``future_labels`` (positive_rate), ``catalog``,
    ``rhythm`` (hour and weekday profiles per service), ``files`` (paths relative to ``out_dir``).
    """
    out = Path(out_dir)
    for sub in ("events", "future_events"):
        (out / sub).mkdir(parents=True, exist_ok=True)
        for old in (out / sub).glob("part-*.parquet"):  # a rerun with fewer chunks must not leave strays
            old.unlink()
    files: dict[str, list[str]] = {"events": [], "future_events": []}

    def sink(c: int, hist: pa.Table, fut: pa.Table) -> None:
        for sub, t in (("events", hist), ("future_events", fut)):
            rel = f"{sub}/part-{c:05d}.parquet"
            # Non-"compliant" list naming keeps the list child called "item", so the file's schema reads
            # back exactly as EVENT_SCHEMA (the compliant name "element" differs under check_metadata).
            pq.write_table(t, out / rel, use_compliant_nested_type=False)
            files[sub].append(rel)

    small, gt = _run(cfg, sink, progress)
    for name, table in small.items():
        pq.write_table(table, out / f"{name}.parquet", use_compliant_nested_type=False)
        files[name] = [f"{name}.parquet"]
    gt["files"] = files
    (out / "ground_truth.json").write_text(json.dumps(gt, indent=2, sort_keys=True) + "\n")
    return gt
