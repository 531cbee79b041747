"""What the stages after training read from a run directory: its recipe, base checkpoint, tokenizer and
prepared data."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from qtune import data as qdata
from qtune import models, rundir
from qtune.recipe import LoadedRecipe

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    loaded: LoadedRecipe
    checkpoint: Path
    tokenizer: object
    prepared: qdata.PreparedData

    def held_out_rows(self) -> list[dict]:
        """The validation rows, or the first 64 plain training rows when the recipe has no validation split."""
        if self.prepared.validation:
            return self.prepared.validation
        log.warning("the recipe has no validation split; measuring on the first 64 training rows instead")
        return [row for row in self.prepared.train[:64] if "attention_mask" not in row and "position_ids" not in row]


def load_context(run_dir: Path) -> RunContext:
    loaded = rundir.load_run_recipe(run_dir)
    recipe = loaded.recipe
    checkpoint = models.resolve_base(recipe.model)
    tokenizer = models.load_tokenizer(checkpoint, recipe.model.trust_remote_code)
    prepared = qdata.prepare_data(recipe.data, tokenizer, loaded.base_dir, recipe.training.seed)
    return RunContext(loaded, checkpoint, tokenizer, prepared)
