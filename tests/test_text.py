"""Caption tokenisation: an offline BPE with RoBERTa's conventions, saved and reloaded from a folder."""

from __future__ import annotations

import pytest
import torch

from psm.data.batch import Sample, collate_samples
from psm.data.metadata import MetadataSpec
from psm.data.text import MAX_LENGTH, build_bpe_tokenizer, load_tokenizer

CAPTIONS = ["birds singing in the forest at dawn", "traffic noise and car horns", "waves on a pebble beach"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_bpe_tokenizer(CAPTIONS * 5, vocab_size=400)


def test_roberta_special_tokens_and_padding(tokenizer):
    out = tokenizer(CAPTIONS, padding="longest", return_tensors="pt")
    ids, mask = out["input_ids"], out["attention_mask"]
    assert (ids[:, 0] == 0).all()  # <s>
    lengths = mask.sum(1)
    assert all(ids[i, lengths[i] - 1] == 2 for i in range(len(CAPTIONS)))  # </s>
    assert (ids[mask == 0] == tokenizer.pad_token_id).all() and tokenizer.pad_token_id == 1
    assert ids.shape[1] == lengths.max()  # padded to the batch's longest caption
    full = tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    assert full["input_ids"].shape == (3, 128)
    long = tokenizer(["birds " * 300], truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    assert long["input_ids"].shape[1] == 128


def test_tokenizer_round_trips_through_a_local_folder(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded(CAPTIONS)["input_ids"] == tokenizer(CAPTIONS)["input_ids"]
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "missing")


def test_collate_tokenises_captions_and_encodes_metadata(tokenizer):
    samples = [
        Sample(
            key=f"k{i}",
            image=torch.zeros(3, 8, 8),
            zoom=1 + 2 * i,
            caption=c,
            waveform=torch.ones(100 + i),
            metadata={"latitude": 10.0, "longitude": 20.0, "month": 5, "hour": None, "audio_source": "iNat"},
        )
        for i, c in enumerate(CAPTIONS)
    ]
    batch = collate_samples(samples, MetadataSpec(), tokenizer)
    assert batch.keys == ["k0", "k1", "k2"] and batch.zoom.tolist() == [1, 3, 5]
    assert batch.input_ids.shape == batch.attention_mask.shape and batch.input_ids.shape[0] == 3
    assert batch.metadata.valid["month"].all() and not batch.metadata.valid["hour"].any()
    assert not batch.metadata.valid["caption_source"].any()
    assert batch.waveforms.shape == (3, 102) and batch.waveform_lengths.tolist() == [100, 101, 102]
    assert batch.to("cpu").images.shape == (3, 3, 8, 8)
