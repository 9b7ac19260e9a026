"""MetaCLIP's balancing: captions matched to a metadata list of entries, each entry's pairs sampled down to
about t, unmatched pairs dropped.

1. Substring matching: a pair matches every entry that occurs in its caption (case-sensitive, as MetaCLIP
   matches), found with an Aho-Corasick automaton (pyahocorasick), so 500k entries cost one pass per caption.
2. N_entry: the number of pairs matching each entry over the whole pool.
3. Each (pair, matched entry) is drawn with probability min(1, t / N_entry); a pair is kept if any of its entries
   was drawn. The draw is a hash of (seed, sample key, entry), so the result does not depend on shard order,
   worker count or anything but the seed.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from contrastive.curation.extra import require
from contrastive.curation.filtering import Selection, shard_id
from contrastive.curation.scoring import caption_text
from contrastive.data.reader import iter_shard
from contrastive.data.transforms import BadSample
from contrastive.errors import ConfigError, InputError


def read_entries(path: str | Path) -> list[str]:
    """One entry a line; blank lines ignored, duplicates kept once (first position)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"metadata file {path} does not exist")
    entries = dict.fromkeys(line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    entries.pop("", None)
    if not entries:
        raise InputError(f"metadata file {path} holds no entries")
    return list(entries)


class EntryMatcher:
    def __init__(self, entries: list[str]) -> None:
        ahocorasick = require("ahocorasick")
        self.entries = entries
        self.automaton = ahocorasick.Automaton()
        for index, entry in enumerate(entries):
            self.automaton.add_word(entry, index)
        self.automaton.make_automaton()

    def __call__(self, text: str) -> list[int]:
        """Indices of the entries found in `text`, each once, in entry order."""
        return sorted({index for _, index in self.automaton.iter(text)})


def draw(seed: int, key: str, entry: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key, entry)."""
    digest = hashlib.blake2b(f"{seed}/{key}/{entry}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@dataclass
class Balanced:
    selection: Selection
    before: Counter  # entry index -> pairs matching it in the pool
    after: Counter  # entry index -> kept pairs matching it
    unmatched: int


def balance(urls: list[str], entries: list[str], t: float, seed: int = 0, progress: bool = True) -> Balanced:
    if t <= 0:
        raise ConfigError(f"--t must be positive, got {t}")
    matcher = EntryMatcher(entries)
    matched: dict[tuple[str, str], list[int]] = {}
    skipped: Counter = Counter()
    pairs = 0
    for url in tqdm(urls, desc="matching", unit="shard", disable=not progress):
        for sample in iter_shard(url, skipped):
            try:
                caption = caption_text(sample)
            except BadSample as bad:
                skipped[bad.reason] += 1
                continue
            pairs += 1
            found = matcher(caption)
            if found:
                matched[(shard_id(url), sample["__key__"])] = found
    before = Counter(entry for found in matched.values() for entry in found)
    kept, after = {}, Counter()
    for (url, key), found in matched.items():
        if any(draw(seed, key, entry) < min(1.0, t / before[entry]) for entry in found):
            kept[(url, key)] = {"metaclip_entries": [entries[entry] for entry in found]}
            after.update(found)
    rules = [{"rule": "matches no entry", "dropped": pairs - len(matched)},
             {"rule": f"no matched entry drawn with probability min(1, {t:g} / N_entry)",
              "dropped": len(matched) - len(kept)}]
    return Balanced(Selection(kept, pairs, rules), before, after, pairs - len(matched))


def histogram(result: Balanced, entries: list[str]) -> dict[str, list[int]]:
    """entry -> [pairs before, pairs after], for every entry some pair matched, most matched first."""
    order = sorted(result.before, key=lambda entry: (-result.before[entry], entry))
    return {entries[entry]: [result.before[entry], result.after[entry]] for entry in order}
