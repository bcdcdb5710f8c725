"""tunelab.data.quality.pii: each kind found with a valid checksum, invalid ones left alone, and never shown unmasked."""

from __future__ import annotations

import pytest

from tunelab.data.quality.pii import KINDS, find_pii, mask_pii, masked_excerpt


def luhn_complete(prefix: str) -> str:
    """`prefix` + the check digit that makes it pass Luhn (written here independently of pii.py)."""
    digits = [int(c) for c in prefix + "0"]
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    return prefix + str((10 - total % 10) % 10)


def kinds(text: str) -> list[tuple[str, str]]:
    return [(m.kind, text[m.start:m.end]) for m in find_pii(text)]


# (text, kind, the matched span, its masked form)
FOUND = [
    ("mail jane.doe@example.com today", "email", "jane.doe@example.com", "j***@e***.com"),
    ("write to ops+alerts@mail.example.co.uk.", "email", "ops+alerts@mail.example.co.uk", "o***@m***.uk"),
    ("card 4242 4242 4242 4242 please", "card_number", "4242 4242 4242 4242", "**** **** **** 4242"),
    ("card 4111-1111-1111-1111", "card_number", "4111-1111-1111-1111", "****-****-****-1111"),
    ("amex 378282246310005", "card_number", "378282246310005", "***********0005"),
    ("13 digits 4222222222222", "card_number", "4222222222222", "*********2222"),
    (f"19 digits {luhn_complete('630400000000000000')}", "card_number", luhn_complete("630400000000000000"),
     "*" * 15 + luhn_complete("630400000000000000")[-4:]),
    # A greedy run of digit groups is trimmed to the groups that pass Luhn.
    ("card 4242 4242 4242 4242 12 thanks", "card_number", "4242 4242 4242 4242", "**** **** **** 4242"),
    ("iban DE89 3704 0044 0532 0130 00 ok", "iban", "DE89 3704 0044 0532 0130 00", "DE** **** **** **** **30 00"),
    ("iban GB82WEST12345698765432 THANKS", "iban", "GB82WEST12345698765432", "GB****************5432"),
    ("iban FR14 2004 1010 0505 0001 3M02 606", "iban", "FR14 2004 1010 0505 0001 3M02 606",
     "FR** **** **** **** **** ***2 606"),
    ("ssn 123-45-6789.", "ssn", "123-45-6789", "***-**-6789"),
    ("ssn 123 45 6789", "ssn", "123 45 6789", "*** ** 6789"),
    ("from 81.2.69.142 yesterday", "ip_address", "81.2.69.142", "81.***.***.***"),
    ("dns 2606:4700:4700::1111", "ip_address", "2606:4700:4700::1111", "2606:****:****"),
    ("call +44 20 7946 0958 now", "phone", "+44 20 7946 0958", "+** ** **** **58"),
    ("call +1 (555) 123-4567", "phone", "+1 (555) 123-4567", "+* (***) ***-**67"),
    ("call (555) 123-4567", "phone", "(555) 123-4567", "(***) ***-**67"),
    ("call 555.123.4567", "phone", "555.123.4567", "***.***.**67"),
    ("call 020 7946 0958", "phone", "020 7946 0958", "*** **** **58"),
]


@pytest.mark.parametrize(("text", "kind", "span", "masked"), FOUND, ids=[f"{k}:{s}" for _, k, s, _ in FOUND])
def test_each_kind_is_found_and_masked(text, kind, span, masked):
    (match,) = find_pii(text)
    assert (match.kind, text[match.start:match.end]) == (kind, span)
    assert match.masked == masked
    assert mask_pii(text)[0] == text.replace(span, masked)


def test_every_kind_has_a_case():
    assert {kind for _, kind, _, _ in FOUND} == set(KINDS)


NOT_FOUND = [
    "card 4242 4242 4242 4241",  # fails Luhn
    "card 4111111111111112",  # fails Luhn
    "zeros 0000 0000 0000 0000",  # passes Luhn, but no card is all zeros
    "iban DE89 3704 0044 0532 0130 01",  # fails mod-97 (and its digit groups are no phone number)
    "iban GB82WEST12345698765433",  # fails mod-97
    "ssn 000-12-3456", "ssn 666-12-3456", "ssn 900-12-3456", "ssn 999-12-3456",  # invalid areas
    "ssn 123-00-4567", "ssn 123-45-0000",  # invalid group, invalid serial
    "ips 192.168.1.1 10.0.0.2 127.0.0.1 0.0.0.0 192.0.2.7",  # private, loopback, unspecified, documentation
    "not ips 300.1.1.1 and 1.2.3.4.5 and version 2.0.1",
    "ipv6 2001:db8::1 and ::1 and times 10:30:00",  # documentation range, loopback, a clock
    "on 2023-10-12 I paid 1,000.50 for order 12345678",  # a date, an amount, an order id
    "I paid £1 extra, room 101, call me at noon",
    "user@localhost is not an address",  # no dot in the domain
]


@pytest.mark.parametrize("text", NOT_FOUND)
def test_invalid_or_harmless_numbers_are_not_reported(text):
    assert kinds(text) == []


def test_overlapping_matches_keep_the_stronger_kind():
    # The card's digit groups also look like phone numbers; the card wins (KINDS order), once.
    text = "pay with 4242-4242-4242-4242 or mail a@b.io"
    assert kinds(text) == [("card_number", "4242-4242-4242-4242"), ("email", "a@b.io")]


def test_masked_excerpt_masks_before_cutting():
    text = "please refund card 4242 4242 4242 4242 and mail jane.doe@example.com about it " * 3
    shown = masked_excerpt(text, limit=45)
    assert len(shown) == 45 and shown.endswith("...")
    assert "4242 4242" not in shown and "**** **** **** 4242" in shown
    # A cut through a match must not leave its first digits in the clear.
    assert masked_excerpt("x 4242 4242 4242 4242", limit=10) == "x **** ..."
    assert masked_excerpt("line one\n\n  line two") == "line one line two"
