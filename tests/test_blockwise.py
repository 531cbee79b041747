"""A model run one block at a time from its (sharded) checkpoint computes exactly what the whole model does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qtune.blockwise import StreamedModel
from qtune.metrics import batches
from support import tiny_model


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_streamed_forward_from_many_shards_equals_the_whole_model(tmp_path: Path, tied: bool):
    model = tiny_model("llama", 0, vocab_size=500, num_hidden_layers=3, max_position_embeddings=128, tie_word_embeddings=tied)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 3 and (tmp_path / "model.safetensors.index.json").is_file()
    rows = [{"input_ids": list(range(5, 5 + n)), "labels": list(range(5, 5 + n)), "num_real_tokens": n} for n in (7, 12, 3)]
    kept = list(batches(rows, pad_token_id=0, batch_size=2))
    streamed = StreamedModel(tmp_path, "cpu")
    assert streamed.tied is tied
    hidden = streamed.final_hidden(kept)
    head = streamed.output_head()
    with torch.no_grad():
        for batch, h in zip(kept, hidden):
            whole = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            assert torch.equal(h, whole)
            assert torch.equal(head(h), model.lm_head(whole))
    assert all(p.is_meta for p in streamed.model.model.layers.parameters()), "blocks are freed after use"
