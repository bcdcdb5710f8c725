r"""Personal data in text: e-mail addresses, phone numbers, payment cards, IBANs, US SSNs, IP addresses.

    find_pii("Mail jane.doe@example.com, card 4242 4242 4242 4242")
      -> [PiiMatch("email", 5, 25, "j***@e***.com"), PiiMatch("card_number", 32, 51, "**** **** **** 4242")]
    mask_pii(same text) -> "Mail j***@e***.com, card **** **** **** 4242"

A match is printed only masked, never whole. Numbers are checked, not just shaped:

    card_number  13-19 digits, optionally grouped by single spaces or dashes, passing Luhn
    iban         2 letters, 2 check digits, 11-30 letters/digits (spaces allowed), mod-97 == 1
    ssn          AAA-GG-SSSS (dashes or spaces); area not 000, 666 or 9xx, group not 00, serial not 0000
    ip_address   IPv4 and IPv6 that are globally routable: 192.168.1.1, 127.0.0.1 or 2001:db8::1
                 identify no one (and fill support and networking data), so they are not reported
    phone        +<country code> then 8-15 digits in groups; or national numbers with separators:
                 (555) 123-4567, 555-123-4567, 555.123.4567, 020 7946 0958 (a 0 trunk prefix)
    email        local@domain.tld

When a number looks like two kinds (a phone inside a card number), the earlier kind in
KINDS wins. The detectors aim at few false alarms on ordinary text (dates, amounts,
version numbers, order ids without a valid checksum) rather than at catching every
format in the world: lint reports them as warnings for a person to look at.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

KINDS: dict[str, str] = {  # kind -> how a message names it; order = priority when matches overlap
    "email": "e-mail address",
    "card_number": "payment card number",
    "iban": "IBAN",
    "ssn": "US social security number",
    "ip_address": "IP address",
    "phone": "phone number",
}


@dataclass(frozen=True, slots=True)
class PiiMatch:
    kind: str  # a key of KINDS
    start: int  # [start, end) character span in the text
    end: int
    masked: str  # what may be printed or written instead


_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")
_SSN = re.compile(r"(?<![\d-])(?<!\d )(\d{3})([- ])(\d{2})\2(\d{4})(?![\d-])(?! \d)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?!\.?\d)")
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:.])")
# Not inside a longer run of digit groups ("DE89 3704 0044 0532 0130 01" holds no phone number).
_ALONE_BEFORE, _ALONE_AFTER = r"(?<![\w.+-])(?<!\d[ .-])", r"(?![\w-])(?![ .-]\d)"
_PHONE = re.compile(
    _ALONE_BEFORE + r"(?:\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,6}"  # +44 20 7946 0958, +1 (555) 123-4567
    r"|(?:\(\d{3}\)|\d{3})[ .-]\d{3}[ .-]\d{4}"  # (555) 123-4567, 555-123-4567, 555.123.4567
    r"|0\d{2,4}[ -]\d{3,4}[ -]?\d{3,4})" + _ALONE_AFTER  # 020 7946 0958
)
_GROUP = re.compile(r"[A-Za-z0-9]+")
_DIGIT = re.compile(r"\d")


def find_pii(text: str) -> list[PiiMatch]:
    """Every PII match in `text`, in order of position, overlaps resolved by KINDS order."""
    found: list[PiiMatch] = []
    has_digit = _DIGIT.search(text) is not None  # cheap filters: most rows have neither
    if "@" in text:
        found += [PiiMatch("email", m.start(), m.end(), _mask_email(m.group())) for m in _EMAIL.finditer(text)]
    if has_digit:
        found += _checked(text, _CARD, "card_number", _luhn_ok, 13, 19, keep=4)
        found += _checked(text, _IBAN, "iban", _iban_ok, 15, 34, keep=4)
        found += [PiiMatch("ssn", m.start(), m.end(), f"***{m.group(2)}**{m.group(2)}{m.group(4)}")
                  for m in _SSN.finditer(text) if _ssn_ok(m.group(1), m.group(3), m.group(4))]
        found += [PiiMatch("ip_address", m.start(), m.end(), m.group().split(".")[0] + ".***.***.***")
                  for m in _IPV4.finditer(text) if _global_ip(m.group())]
    if ":" in text:
        found += [PiiMatch("ip_address", m.start(), m.end(), m.group().split(":")[0] + ":****:****")
                  for m in _IPV6.finditer(text) if _global_ip(m.group())]
    if has_digit:
        found += [PiiMatch("phone", m.start(), m.end(), _mask_digits(m.group(), keep=2))
                  for m in _PHONE.finditer(text) if 8 <= _digits(m.group()) <= 15]
    priority = list(KINDS)
    kept: list[PiiMatch] = []
    for match in sorted(found, key=lambda m: (priority.index(m.kind), m.start)):
        if all(match.end <= k.start or match.start >= k.end for k in kept):
            kept.append(match)
    return sorted(kept, key=lambda m: m.start)


def mask_pii(text: str) -> tuple[str, list[PiiMatch]]:
    """`text` with every match replaced by its masked form, and the matches."""
    matches = find_pii(text)
    out, pos = [], 0
    for m in matches:
        out += [text[pos: m.start], m.masked]
        pos = m.end
    out.append(text[pos:])
    return "".join(out), matches


# ---------------------------------------------------------------- checks


def _luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0 and len(set(digits)) > 1  # 0000 0000 0000 0000 passes Luhn but is no card


def _iban_ok(compact: str) -> bool:
    """ISO 13616: move the first 4 characters to the end, letters -> 10..35, the number mod 97 is 1."""
    if not (compact[:2].isalpha() and compact[2:4].isdigit()):
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _ssn_ok(area: str, group: str, serial: str) -> bool:
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _global_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:  # 300.1.1.1, 01.2.3.4, 12:30:45 ...
        return False


def _checked(text: str, pattern: re.Pattern[str], kind: str, ok, lo: int, hi: int, keep: int) -> list[PiiMatch]:
    """Matches of `pattern` whose characters (separators dropped) pass `ok` and number lo..hi.

    The pattern is greedy, so "card 4242 4242 4242 4242 12/25" first offers an 18-digit run;
    when the whole run fails, the longest run of its groups that passes is taken instead.
    """
    out = []
    for m in pattern.finditer(text):
        groups = list(_GROUP.finditer(m.group()))
        spans = sorted(((a, b) for a in range(len(groups)) for b in range(a + 1, len(groups) + 1)),
                       key=lambda ab: ab[0] - ab[1])  # longest first, then leftmost
        for a, b in spans:
            compact = "".join(g.group() for g in groups[a:b])
            if lo <= len(compact) <= hi and ok(compact):
                start, end = m.start() + groups[a].start(), m.start() + groups[b - 1].end()
                out.append(PiiMatch(kind, start, end, _mask_alnum(text[start:end], keep)))
                break
    return out


# ---------------------------------------------------------------- masks


def _mask_email(address: str) -> str:
    """jane.doe@mail.example.com -> j***@m***.com"""
    local, _, domain = address.partition("@")
    labels = domain.split(".")
    return f"{local[0]}***@{labels[0][0]}***.{labels[-1]}"


def _mask_alnum(text: str, keep: int) -> str:
    """Letters and digits -> '*', except an IBAN's country code and the last `keep`: DE** **** ... **30 00."""
    chars = list(text)
    positions = [i for i, c in enumerate(chars) if c.isalnum()]
    hidden = positions[:-keep] if keep else positions
    for i in hidden:
        if not (chars[i].isalpha() and i < 2):  # the two letters that open an IBAN stay
            chars[i] = "*"
    return "".join(chars)


def _mask_digits(text: str, keep: int) -> str:
    chars = list(text)
    digits = [i for i, c in enumerate(chars) if c.isdigit()]
    for i in digits[:-keep]:
        chars[i] = "*"
    return "".join(chars)


def _digits(text: str) -> int:
    return sum(c.isdigit() for c in text)


def masked_excerpt(text: str, limit: int = 60) -> str:
    """A short, one-line, PII-masked piece of `text` for a message: masked first, then cut (a cut never unmasks)."""
    flat = " ".join(mask_pii(text)[0].split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
