"""Write the quickstart dataset: extract a person's name, age and city from one sentence, as three lines.

The task is scored by exact match, so a base model that answers in prose or in any other layout
fails it, while a few minutes of LoRA training teach the layout and the copying. Validation names
and cities are drawn from lists the training split never uses, so the model must copy, not recall.

Every name and city follows a space, in the sentence and in the answer (``city: Geneva``), so the
answer repeats the input's own tokens. An earlier version answered in JSON, where a value follows a
quote: there `` Geneva`` must be spelled again as ``Gene`` + ``va``, which a 135M model does for unseen
names with probabilities near 0.5, so any 4-bit export flipped whole groups of answers and the
quickstart passed or failed its gates depending on the CPU (docs/benchmarks.md).

    python scripts/make_quickstart_data.py recipes/data
"""

import json
import random
import sys
from pathlib import Path

FIRST_NAMES = """
Alice Bruno Chiara Dmitri Elena Farid Grace Hiroshi Ines Jonas Kavya Liam Mei Nikolai Olivia Pablo Quinn Rosa
Samir Tessa Umar Vera Wen Ximena Yusuf Zoe Arjun Beatriz Connor Daria Emeka Freya Gustavo Hana Ivan Julia Kofi
Lena Mateo Nadia Oscar Priya Rafael Sofia Tomas Ulla Viktor Wanda Yara Zain Aiko Boris Carmen Diego Edith Fatima
Gianni Helga Idris Jana Kenji Lucia Marek Noor Otto Paula Reza Selin Theo Uma Valentin Wiebke Xavier Yasmin Zora
""".split()
LAST_NAMES = """
Smith Rossi Novak Tanaka Garcia Okafor Larsen Dubois Kowalski Chen Haddad Silva Murphy Ivanova Patel Schmidt
Moreau Nguyen Costa Berg Ahmed Keller Lopez Mensah Sato Weber Fischer Romano Jensen Kim Abbott Barros Carver
Dahl Ekwueme Ferreira Gallo Hoffmann Iyer Jovanovic Kaur Lindqvist Mahler Nakamura Oduya Petrov Quispe Reyes
Sandoval Takahashi Urban Varga Walsh Xu Yilmaz Zamora Andersen Bianchi Cruz Delacroix Engel Fujita Grant Hale
""".split()
CITIES = """
Paris Lisbon Nairobi Osaka Toronto Krakow Lima Oslo Cairo Denver Seville Hanoi Dublin Porto Zurich Accra Bogota
Vienna Perth Tunis Quito Riga Austin Leeds Kyoto Turin Hamburg Bergen Busan Malaga Athens Boston Chennai Dhaka
Essen Florence Glasgow Havana Istanbul Jakarta Kampala Lagos Manila Naples Odessa Prague Quebec Rabat Santiago
Tehran Utrecht Valencia Warsaw Yokohama Zagreb Adelaide Bilbao Calgary Dresden Edinburgh Fukuoka Graz Helsinki
Izmir Jaipur Kiev Leipzig Montreal Nagoya Oporto Pune Recife Salzburg Tallaght Ulm Vilnius Wellington Xiamen
Yerevan Zaragoza Antwerp Bremen Cordoba Delft Eindhoven Fez Genoa Hobart Innsbruck Krakow Lucerne Marseille
""".split()
HELD_OUT_FIRST = """
Amara Bjorn Celine Dario Esther Felix Gita Hugo Ingrid Jamal Kira Lars Mina Nils Orla Pavel Anika Cyril Dagny
Elif Fabio Greta Hamid Ilse Joren Kasia Lotte Milan Nora Oskar Petra Rania Sven Talia Ugo
""".split()
HELD_OUT_LAST = """
Alvarez Brennan Castillo Duarte Eriksen Fontaine Grieve Holm Ito Jurado Kovacs Lund Moretti Novotny Okoro Pereira
Quinlan Rasmussen Sorensen Tiwari Ueda Vidal Wojcik Zeller
""".split()
HELD_OUT_CITIES = """
Madrid Geneva Ottawa Dakar Tallinn Sapporo Lyon Munich Nantes Sydney Bordeaux Kobe Lille Brno Gdansk Turku Aarhus
Seattle Phoenix Tampa Nashville Orlando Kolkata Hyderabad Surabaya Medan Cusco Arequipa Rosario Mendoza Fortaleza
Belem Cork Galway Dundee Toulouse Nice Basel Bern Lausanne Trieste Padua Bari Seoul Taipei Darwin
""".split()

TEMPLATES = {
    "prose": "Our new member {name} is {age} years old and lives in {city}.",
    "fields": "Name: {name} | Age: {age} | City: {city}",
    "apposition": "A {city} resident, {name}, aged {age}, joined the club.",
    "intro": "Meet {name} ({age}) from {city}!",
    "reordered": "Age {age}, city {city}, full name {name}.",
    "letter": "Dear team, my name is {name}, I am {age}, and I moved to {city} last year.",
}
INSTRUCTION = 'Extract the person as three lines: "name: ...", "age: ..." and "city: ...".'


def answer(person: dict) -> str:
    return f"name: {person['name']}\nage: {person['age']}\ncity: {person['city']}"


def make_split(rng: random.Random, count: int, first: list, last: list, cities: list) -> list[dict]:
    records = []
    for _ in range(count):
        category = rng.choice(sorted(TEMPLATES))
        person = {"name": f"{rng.choice(first)} {rng.choice(last)}", "age": rng.randint(18, 89), "city": rng.choice(cities)}
        records.append(
            {
                "instruction": INSTRUCTION,
                "input": TEMPLATES[category].format(**person),
                "output": answer(person),
                "category": category,
            }
        )
    return records


def main(out_dir: str) -> None:
    for held_out, seen in ((HELD_OUT_FIRST, FIRST_NAMES), (HELD_OUT_LAST, LAST_NAMES), (HELD_OUT_CITIES, CITIES)):
        assert not set(held_out) & set(seen), f"held-out names also in training: {sorted(set(held_out) & set(seen))}"
    rng = random.Random(20261123)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits = {
        "quickstart_train.jsonl": make_split(rng, 800, FIRST_NAMES, LAST_NAMES, CITIES),
        "quickstart_validation.jsonl": make_split(rng, 60, HELD_OUT_FIRST, HELD_OUT_LAST, HELD_OUT_CITIES),
    }
    for name, records in splits.items():
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in records))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "recipes/data")
