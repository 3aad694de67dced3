"""What a generation uses where its caller does not say, and the largest settings a caller may ask
for: the one table of them.

`chargen sample`'s options and the service's built-in CHARGEN_DEFAULT_* values (service/config.py)
start from DEFAULTS; the HTTP schemas (service/schemas.py) and the command line refuse a temperature
above MAX_TEMPERATURE. The model's own records (GenerationRequest, SamplingSettings) have no
defaults for what a user sets.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Defaults:
    max_chars: int  # characters to generate
    temperature: float  # 0 is greedy
    top_k: int  # 0: off
    top_p: float  # 1: off


DEFAULTS = Defaults(max_chars=200, temperature=0.8, top_k=0, top_p=1.0)

# Beyond about 5 a character model's distribution is close to uniform already: a higher temperature
# changes nothing visible, and an unbounded one (1e308) is more likely a mistake than a wish.
# OpenAI allows 0..2; llama.cpp states no bound.
MAX_TEMPERATURE = 10.0
# At or above the vocabulary size top_k filters nothing; this only bounds the number (a character
# vocabulary, even of CJK text, has fewer characters).
MAX_TOP_K = 1_000_000
