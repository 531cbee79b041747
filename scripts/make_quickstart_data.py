"""Write the quickstart dataset: extract a person's name, age and city from one sentence as JSON.

The task is scored by exact match, so a base model that answers in prose or in any other JSON
layout fails it, while a few minutes of LoRA training teach the layout and the copying.
Validation names and cities are drawn from lists the training split never uses.

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
HELD_OUT_FIRST = "Amara Bjorn Celine Dario Esther Felix Gita Hugo Ingrid Jamal Kira Lars Mina Nils Orla Pavel".split()
HELD_OUT_LAST = "Alvarez Brennan Castillo Duarte Eriksen Fontaine Grieve Holm Ito Jurado Kovacs Lund".split()
HELD_OUT_CITIES = "Madrid Geneva Ottawa Dakar Tallinn Sapporo Lyon Munich Nantes Sydney Bordeaux Kobe".split()

TEMPLATES = {
    "prose": "{name} is {age} years old and lives in {city}.",
    "fields": "Name: {name} | Age: {age} | City: {city}",
    "apposition": "{city} resident {name}, aged {age}, joined the club.",
    "intro": "Meet {name} ({age}) from {city}!",
    "reordered": "Age {age}, city {city}, full name {name}.",
    "letter": "Dear team, my name is {name}, I am {age}, and I moved to {city} last year.",
}
INSTRUCTION = 'Extract the person as JSON with the keys "name", "age" and "city".'


def make_split(rng: random.Random, count: int, first: list, last: list, cities: list) -> list[dict]:
    records = []
    for _ in range(count):
        category = rng.choice(sorted(TEMPLATES))
        person = {"name": f"{rng.choice(first)} {rng.choice(last)}", "age": rng.randint(18, 89), "city": rng.choice(cities)}
        records.append({
            "instruction": INSTRUCTION,
            "input": TEMPLATES[category].format(**person),
            "output": json.dumps(person),
            "category": category,
        })
    return records


def main(out_dir: str) -> None:
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
