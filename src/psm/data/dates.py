"""Recording dates as free text → month and hour with validity flags (the paper's time metadata)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from dateutil import parser as date_parser


@dataclass(frozen=True)
class ParsedDate:
    """Month (1–12) and hour (0–23) of a recording, each with a flag saying whether it is known."""

    month: int | None
    hour: int | None

    @property
    def month_valid(self) -> bool:
        return self.month is not None

    @property
    def hour_valid(self) -> bool:
        return self.hour is not None


def clean_date_text(text: str) -> str:
    """Official clean-up before parsing: lower-case, cut just after the first "am"/"pm", or before "gmt".

    Time-zone names after am/pm (e.g. "3:11 PM EDT") confuse dateutil, hence the cut. Like the official
    code it looks for the substrings anywhere, so "amsterdam 2011-07-26" is cut after "am" and fails.
    """
    t = text.lower().strip()
    for pattern, keep in (("am", 2), ("pm", 2), ("gmt", 0)):
        i = t.find(pattern)
        if i >= 0:
            return t[: i + keep].strip()
    return t


# Two different defaults reveal which fields the text really contained (dateutil fills in the rest). Both
# years are leap years so that "Feb 29" without a year parses with either default.
_DEFAULTS = (dt.datetime(2000, 1, 1, 0, 0), dt.datetime(2004, 2, 2, 1, 1))


def parse_date(text: object, *, time_missing_means_midnight: bool = True) -> ParsedDate:
    """Parse a free-text date (e.g. '2021/10/31 3:11 PM EDT', 'June 26th, 2010', '1/29/09 10:28').

    Unparseable text gives neither month nor hour; text without a month gives no month (dateutil alone
    would fill in today's). A date without a time of day gives hour 0 and counts as known by default, as in
    the official loader (a quirk, see docs/faithfulness.md); ``time_missing_means_midnight=False`` marks the
    hour unknown instead.
    """
    if not isinstance(text, str) or not text.strip():
        return ParsedDate(None, None)
    cleaned = clean_date_text(text)
    try:
        a, b = (date_parser.parse(cleaned, default=d) for d in _DEFAULTS)
    except (ValueError, OverflowError, TypeError):
        return ParsedDate(None, None)
    month = a.month if a.month == b.month else None
    # The hour alone decides: "3 PM" or "7 am" carry no minutes (dateutil fills in the default's) but do
    # carry the hour.
    has_time = a.hour == b.hour
    hour = a.hour if has_time else (0 if time_missing_means_midnight else None)
    return ParsedDate(month, hour)
