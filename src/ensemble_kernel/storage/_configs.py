"""Training configurations: runs grouped by the SHA-256 of their `code` string.

The published CIFAR-10 runs mix four training configurations in one folder; each run
file carries the script that trained it (`code`). Runs whose code differs come from
different recipes, and concatenating them silently mixes ensembles. This module groups
runs by code hash, says so in one warning line when a source mixes them, and resolves a
`--code PREFIX` to exactly one group (an unknown or ambiguous prefix is an error that
lists the choices).
"""

from __future__ import annotations

import hashlib
import re
import warnings
from typing import Sequence

from ..errors import InputError

__all__ = ["code_hash", "code_groups", "describe_groups", "warn_if_mixed", "resolve_code",
           "NO_CODE"]

NO_CODE = "(no code)"  # the group of runs whose file carries no code string
SHOWN = 12  # hex digits of a hash shown to the user


def code_hash(code: str | None) -> str | None:
    """SHA-256 (hex) of a code string, as the store keys it; None for no code."""
    return None if code is None else hashlib.sha256(code.encode()).hexdigest()


def code_groups(pairs: Sequence[tuple[str | None, int]]) -> dict[str | None, int]:
    """{code hash: run count} from (hash, runs) pairs, in order of first appearance."""
    out: dict[str | None, int] = {}
    for sha, n in pairs:
        out[sha] = out.get(sha, 0) + n
    return out


def _name(sha: str | None) -> str:
    return NO_CODE if sha is None else sha[:SHOWN]


def describe_groups(groups: dict[str | None, int]) -> str:
    """'3fa2c1d0e4b5 (3 runs), (no code) (2 runs)'."""
    return ", ".join(f"{_name(sha)} ({n} run{'s' if n != 1 else ''})" for sha, n in groups.items())


def warn_if_mixed(groups: dict[str | None, int], where: str) -> None:
    """One warning line when `groups` holds more than one training configuration."""
    if len(groups) > 1:
        warnings.warn(f"{where} mixes {len(groups)} training configurations (code sha256: "
                      f"{describe_groups(groups)}) and uses their runs together; pass "
                      "--code PREFIX to use one", stacklevel=2)


def resolve_code(prefix: str, groups: dict[str | None, int], where: str) -> str:
    """The one code hash of `groups` that starts with `prefix`, else InputError.

    Parameters
    ----------
    prefix : hexadecimal digits (any case), at least one.
    groups : {code hash or None: run count}, as from `code_groups`.
    where : what SRC is called in the message.
    """
    text = prefix.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{1,64}", text):
        raise InputError(f"--code takes the first hex digits of a code sha256, got {prefix!r}; "
                         f"{where} has {describe_groups(groups)}")
    matches = [sha for sha in groups if sha is not None and sha.startswith(text)]
    if not matches:
        raise InputError(f"--code {prefix} matches none of the training configurations in "
                         f"{where}: {describe_groups(groups)}; pass one of these prefixes")
    if len(matches) > 1:
        both = describe_groups({sha: groups[sha] for sha in matches})
        raise InputError(f"--code {prefix} is ambiguous in {where}: it matches {both}; pass "
                         "more digits")
    return matches[0]
