"""Every metadata encoding, validity handling and bad-value errors."""

from __future__ import annotations

import math

import pytest
import torch

from psm.data.metadata import (
    MetadataError,
    MetadataSpec,
    check_metadata_names,
    parse_official_metadata_type,
)

OFFICIAL = MetadataSpec()


def test_location_encoding_matches_official_formula():
    lat, lon = 37.5, -120.25
    enc = OFFICIAL.encode_location(torch.tensor([lat], dtype=torch.float64), torch.tensor([lon], dtype=torch.float64))
    expected = [
        math.sin(math.pi * lat / 90),
        math.cos(math.pi * lat / 90),
        math.sin(math.pi * lon / 180),
        math.cos(math.pi * lon / 180),
    ]
    assert enc[0].tolist() == pytest.approx(expected, abs=1e-12)


def test_official_latitude_quirk_and_its_fix():
    poles = torch.tensor([90.0, -90.0], dtype=torch.float64)
    zero = torch.zeros(2, dtype=torch.float64)
    official = OFFICIAL.encode_location(poles, zero)
    assert torch.allclose(official[0], official[1], atol=1e-12)  # the two poles coincide
    fixed = MetadataSpec(latitude_period_deg=360.0).encode_location(poles, zero)
    assert not torch.allclose(fixed[0], fixed[1])


def test_hour_encoding_official_period_23_and_fix():
    hours = torch.tensor([0.0, 23.0, 6.0], dtype=torch.float64)
    enc = OFFICIAL.encode_hour(hours)
    assert enc[2].tolist() == pytest.approx([math.sin(2 * math.pi * 6 / 23), math.cos(2 * math.pi * 6 / 23)])
    assert torch.allclose(enc[0], enc[1], atol=1e-12)  # official: hours 0 and 23 coincide
    fixed = MetadataSpec(hour_period=24.0).encode_hour(hours)
    assert not torch.allclose(fixed[0], fixed[1])


def test_month_encoding():
    enc = OFFICIAL.encode_month(torch.tensor([3.0, 12.0], dtype=torch.float64))
    assert enc[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-12)  # 2π·3/12 = π/2
    assert enc[1].tolist() == pytest.approx([0.0, 1.0], abs=1e-12)


def test_source_ids_follow_the_official_vocabularies():
    md = OFFICIAL.encode(
        audio_source=["yfcc", "iNat", "aporee", "freesound"], caption_source=["meta", "qwen", "pengi", "meta"]
    )
    assert md.values["audio_source"].tolist() == [0, 1, 2, 3]
    assert md.values["caption_source"].tolist() == [0, 1, 2, 0]


def test_missing_and_nan_values_are_invalid_and_zero():
    md = OFFICIAL.encode(
        latitude=[10.0, float("nan")],
        longitude=[5.0, 5.0],
        hour=[3.0, float("nan")],
        audio_source=["iNat", None],
    )
    assert md.valid["location"].tolist() == [True, False]
    assert md.valid["hour"].tolist() == [True, False]
    assert md.valid["audio_source"].tolist() == [True, False]
    assert md.values["hour"][1].abs().sum() == 0
    # month and caption source were not given at all: invalid for every row
    assert md.valid["month"].tolist() == [False, False]
    assert md.valid["caption_source"].tolist() == [False, False]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("month", 13.0, "month out of range"),
        ("hour", 24.0, "hour out of range"),
        ("latitude", 91.0, "latitude out of range"),
    ],
)
def test_out_of_range_values_name_the_row(field, value, message):
    kwargs = {"latitude": [0.0, 0.0], "longitude": [0.0, 0.0], "month": [1.0, 1.0], "hour": [1.0, 1.0]}
    kwargs[field] = [1.0, value]
    with pytest.raises(MetadataError, match=message) as err:
        OFFICIAL.encode(**kwargs)
    assert "row 1" in str(err.value)


def test_unknown_source_and_type_names_are_clear_errors():
    with pytest.raises(MetadataError, match=r"row 1: unknown audio_source 'tiktok'"):
        OFFICIAL.encode(audio_source=["iNat", "tiktok"])
    with pytest.raises(MetadataError, match="unknown metadata type 'weather'"):
        check_metadata_names(["month", "weather"])


def test_official_names_and_metadata_type_strings():
    assert check_metadata_names(["latlong", "time", "asource"]) == ("location", "hour", "audio_source")
    assert parse_official_metadata_type("latlong_month_time_asource_tsource") == (
        "audio_source",
        "caption_source",
        "location",
        "month",
        "hour",
    )
    assert parse_official_metadata_type("month_time_asource") == ("audio_source", "month", "hour")
    assert parse_official_metadata_type("none") == ()


def test_spec_keeps_official_token_order_and_round_trips():
    spec = MetadataSpec(types=("hour", "location"))
    assert spec.types == ("location", "hour")
    assert MetadataSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(MetadataError, match="unknown metadata config keys"):
        MetadataSpec.from_dict({"hour_perod": 24})


def test_missing_sources_in_a_nullable_string_column_are_unknown():
    # pandas' "string" dtype holds gaps as pd.NA, whose truth value raises: they are left out, as None and NaN.
    import pandas as pd

    spec = MetadataSpec()
    md = spec.encode(
        audio_source=pd.Series(["iNat", pd.NA, None], dtype="string"),
        caption_source=pd.Series(["meta", "qwen", pd.NA], dtype="string"),
    )
    assert md.valid["audio_source"].tolist() == [True, False, False]
    assert md.valid["caption_source"].tolist() == [True, True, False]
    assert md.values["audio_source"][0] == spec.audio_sources.index("iNat")
