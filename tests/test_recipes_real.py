"""The ready recipes for real bases and public datasets (every recipes/*.yaml but the quickstart).

Nothing is downloaded. Each recipe must validate as written, with its base model's architecture known
the way it would be on a user's machine: from ``config.json`` in the Hugging Face cache, planted here
with the ``model_type`` the hub's config holds. Then its data section runs end to end on a stand-in of
its hub dataset: a few dozen rows with the real columns and row shapes, as parquet files named after
the real splits, which ``datasets.load_dataset`` reads as it would the hub repository (split names and
slices included). Only the hub id is swapped for the stand-in's folder; format, field names and every
other data setting are the recipe's own, so a wrong column mapping or split name fails here.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from qtune.data import IGNORE_INDEX, load_records, prepare_data
from qtune.errors import QtuneError
from qtune.recipe import RecipeError, base_model_type, load_recipe
from support import REPO, decode, label_spans

RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml") if p.name != "quickstart.yaml")
EXPECTED_RECIPES = {"llama3.1-8b-alpaca.yaml", "mistral-7b-ultrachat.yaml", "qwen2.5-7b-dolly.yaml", "smollm2-1.7b-no-robots.yaml"}

# config.json's model_type of each base on the hub; a recipe for a new base adds its line here.
BASE_MODEL_TYPES = {
    "meta-llama/Llama-3.1-8B-Instruct": "llama",
    "mistralai/Mistral-7B-Instruct-v0.3": "mistral",
    "Qwen/Qwen2.5-7B-Instruct": "qwen2",
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": "llama",
}


# ---------------------------------------------------------------- stand-ins for the hub datasets


@dataclass(frozen=True)
class Row:
    record: dict  # one row, with exactly the hub dataset's columns
    prompts: tuple[str, ...]  # texts the model must see but never be trained on
    answers: tuple[str, ...]  # texts the model must be trained on


def alpaca_cleaned(split: str, i: int) -> Row:
    """yahma/alpaca-cleaned: instruction, input (empty for most rows), output."""
    instruction = f"Rewrite sentence [{split} {i}] in the passive voice."
    extra = f"The cat chased mouse [{split} {i}]." if i % 3 == 0 else ""
    output = f"Mouse [{split} {i}] was chased by the cat."
    return Row({"instruction": instruction, "input": extra, "output": output}, (instruction, extra) if extra else (instruction,), (output,))


def dolly(split: str, i: int) -> Row:
    """databricks/databricks-dolly-15k: instruction, context (empty for open questions), response, category."""
    categories = ("open_qa", "closed_qa", "classification", "brainstorming", "information_extraction", "summarization", "creative_writing", "general_qa")
    category = categories[i % len(categories)]
    instruction = f"Question [{split} {i}]: when did the ship sail?"
    with_passage = category in ("closed_qa", "information_extraction", "summarization")
    context = f"Passage [{split} {i}]: the ship sailed in 1851 from Boston." if with_passage else ""
    response = f"Answer [{split} {i}]: it sailed in 1851."
    prompts = (instruction, context) if context else (instruction,)
    return Row({"instruction": instruction, "context": context, "response": response, "category": category}, prompts, (response,))


def conversation(split: str, i: int, turns: int, system: str | None = None) -> tuple[list[dict], tuple[str, ...], tuple[str, ...]]:
    messages = [{"content": system, "role": "system"}] if system else []
    prompts, answers = ((system,) if system else ()), ()
    for turn in range(turns):
        question = f"User turn [{split} {i}.{turn}]: how do tides work?"
        answer = f"Assistant turn [{split} {i}.{turn}]: the moon pulls the oceans."
        messages += [{"content": question, "role": "user"}, {"content": answer, "role": "assistant"}]
        prompts, answers = prompts + (question,), answers + (answer,)
    return messages, prompts, answers


def ultrachat(split: str, i: int) -> Row:
    """HuggingFaceH4/ultrachat_200k: prompt, prompt_id, messages (user/assistant turns, no system message)."""
    messages, prompts, answers = conversation(split, i, turns=1 + i % 3)
    prompt = messages[0]["content"]
    record = {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages}
    return Row(record, prompts, answers)


def no_robots(split: str, i: int) -> Row:
    """HuggingFaceH4/no_robots: prompt, prompt_id, messages (Chat rows open with a system message), category."""
    categories = ("Generation", "Open QA", "Brainstorm", "Chat", "Rewrite", "Summarize", "Coding", "Classify", "Closed QA", "Extract")
    category = categories[i % len(categories)]
    system = f"System [{split} {i}]: you are a cheerful pirate." if category == "Chat" else None
    messages, prompts, answers = conversation(split, i, turns=3 if category == "Chat" else 1, system=system)
    prompt = messages[1 if system else 0]["content"]
    record = {"prompt": prompt, "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(), "messages": messages, "category": category}
    return Row(record, prompts, answers)


@dataclass(frozen=True)
class StandIn:
    splits: tuple[str, ...]  # the real dataset's split names
    row: Callable[[str, int], Row]
    rows_per_split: int = 30

    def write(self, folder: Path) -> dict[str, Row]:
        """Parquet files laid out as on the hub; returns every row, keyed by its record."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        (folder / "data").mkdir(parents=True)
        rows = {}
        for split in self.splits:
            made = [self.row(split, i) for i in range(self.rows_per_split)]
            pq.write_table(pa.Table.from_pylist([r.record for r in made]), folder / "data" / f"{split}-00000-of-00001.parquet")
            rows.update({record_key(r.record): r for r in made})
        return rows


STAND_INS = {
    "yahma/alpaca-cleaned": StandIn(("train",), alpaca_cleaned),
    "databricks/databricks-dolly-15k": StandIn(("train",), dolly),
    "HuggingFaceH4/ultrachat_200k": StandIn(("train_sft", "test_sft", "train_gen", "test_gen"), ultrachat),
    "HuggingFaceH4/no_robots": StandIn(("train", "test"), no_robots),
}


def record_key(record: dict) -> str:
    return json.dumps(record, sort_keys=True)


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No socket may connect, and the Hugging Face caches are empty folders under tmp_path."""
    import datasets
    from huggingface_hub import constants

    def refuse(*args, **kwargs):
        raise AssertionError("the recipe tests must not reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    return tmp_path / "hf-hub"


def plant_config(hub_cache: Path, repo_id: str, revision: str | None, model_type: str) -> None:
    """What downloading the model's config.json leaves in the Hugging Face cache."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / (revision or "main")).write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit / "config.json").write_text(json.dumps({"model_type": model_type}))


def with_stand_ins(recipe: Path, folder: Path, overrides: tuple[str, ...] = ()):
    """The recipe with every hub data source read from a stand-in folder; returns it and the stand-in rows."""
    data = load_recipe(recipe, list(overrides)).recipe.data
    rows: dict[str, Row] = {}
    replaced = list(overrides)
    for split in ("train", "validation"):
        sources = []
        for source in getattr(data, split):
            if source.hub is None:
                sources.append(source.model_dump(exclude_none=True))
                continue
            assert source.hub in STAND_INS, f"no stand-in for the hub dataset '{source.hub}': add one to STAND_INS with its real columns and splits"
            assert source.subset is None, "the stand-ins have no subsets (configs) yet"
            local = folder / source.hub.replace("/", "--")
            if not local.exists():
                rows.update(STAND_INS[source.hub].write(local))
            sources.append({"hub": str(local), "split": source.split})
        if sources:
            replaced.append(f"data.{split}={json.dumps(sources)}")
    return load_recipe(recipe, replaced), rows


# ---------------------------------------------------------------- tests


def test_the_ready_recipes_are_all_there():
    assert EXPECTED_RECIPES <= {p.name for p in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_validates_offline_and_its_base_can_be_exported(recipe, offline):
    header = [line for line in recipe.read_text().splitlines()[:5] if line.startswith("#")]
    assert 2 <= len(header) <= 4, "a recipe opens with 2-4 comment lines: what it trains, GPU memory and time, how to run it"

    loaded = load_recipe(recipe)  # an empty cache: the architecture is unknown and not downloaded
    model, recipe_cfg = loaded.recipe.model, loaded.recipe
    assert model.base in BASE_MODEL_TYPES, f"add the model_type of {model.base}'s config.json to BASE_MODEL_TYPES"
    assert recipe_cfg.data.validation or recipe_cfg.data.validation_fraction, "a ready recipe holds data out for evaluation"
    assert recipe_cfg.evaluation.max_samples, "a ready recipe bounds evaluation.max_samples"

    plant_config(offline, model.base, model.revision, BASE_MODEL_TYPES[model.base])
    assert base_model_type(model, loaded.base_dir) == BASE_MODEL_TYPES[model.base]
    load_recipe(recipe)  # now the export targets are checked against the base's architecture too

    if recipe_cfg.export:  # the check really runs: the same recipe on an architecture qtune cannot export fails
        plant_config(offline, model.base, model.revision, "gpt2")
        with pytest.raises(RecipeError, match="architecture 'gpt2' cannot be exported"):
            load_recipe(recipe)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipe_data_dry_run_on_a_stand_in(recipe, offline, tmp_path, smol_tokenizer):
    loaded, stand_in_rows = with_stand_ins(recipe, tmp_path / "datasets")
    cfg = loaded.recipe.data
    prepared = prepare_data(cfg, smol_tokenizer, loaded.base_dir, loaded.recipe.training.seed)

    # the rows that came through the recipe's own splits (and slices), traced back to the stand-in
    train_records = load_records(cfg.train, loaded.base_dir)
    assert cfg.max_train_samples is None or cfg.max_train_samples >= len(train_records), "the stand-in outgrew max_train_samples"
    used = [stand_in_rows[record_key(r)] for r in [*train_records, *load_records(cfg.validation, loaded.base_dir)]]
    train, validation = prepared.reports["train"], prepared.reports["validation"]
    assert train.examples + validation.examples == len(used)
    assert train.dropped_overlong == train.dropped_no_labels == validation.dropped_overlong == validation.dropped_no_labels == 0
    assert prepared.validation, "the recipe's validation split came out empty"

    seen, trained = [], []
    for row in [*prepared.train, *prepared.validation]:
        assert row["labels"][0] == IGNORE_INDEX, "every row starts with a masked prompt"
        assert any(label != IGNORE_INDEX for label in row["labels"]), "every row has answer tokens to learn"
        seen.append(decode(smol_tokenizer, row["input_ids"]))
        trained += label_spans(smol_tokenizer, row["labels"])
    seen_text, trained_text = "\n".join(seen), "\n".join(trained)
    for row in used:
        for answer in row.answers:
            assert answer in trained_text, f"answer not trained on: {answer!r}"
        for prompt in row.prompts:
            assert prompt in seen_text, f"prompt text lost (wrong data.fields?): {prompt!r}"
            assert prompt not in trained_text, f"prompt text trained on: {prompt!r}"

    assert prepared.eval_prompts, "evaluation needs prompts with reference answers"
    answers = {answer for row in used for answer in row.answers}
    has_category = cfg.fields.category in used[0].record
    for item in prepared.eval_prompts:
        assert item["reference"] in answers
        assert item["prompt"].endswith("<|im_start|>assistant\n")  # ready for generation
        assert (item["category"] is not None) == has_category


@pytest.mark.parametrize(
    ("recipe", "override", "complaint"),
    [
        ("qwen2.5-7b-dolly.yaml", "data.fields.output=output", "miss fields"),  # dolly calls it 'response'
        ("mistral-7b-ultrachat.yaml", "data.format=alpaca", "miss fields"),
    ],
)
def test_the_dry_run_catches_a_wrong_column_mapping(recipe, override, complaint, offline, tmp_path, smol_tokenizer):
    loaded, _ = with_stand_ins(REPO / "recipes" / recipe, tmp_path / "datasets", (override,))
    with pytest.raises(QtuneError, match=complaint):
        prepare_data(loaded.recipe.data, smol_tokenizer, loaded.base_dir, 0)


def test_the_dry_run_catches_a_wrong_split_name(offline, tmp_path, smol_tokenizer):
    recipe = REPO / "recipes" / "mistral-7b-ultrachat.yaml"
    loaded, _ = with_stand_ins(recipe, tmp_path / "datasets", ("data.validation=[{hub: HuggingFaceH4/ultrachat_200k, split: test}]",))
    with pytest.raises(QtuneError, match="Unknown split"):
        prepare_data(loaded.recipe.data, smol_tokenizer, loaded.base_dir, 0)
