"""The fixed engine-benchmark workload, shared by Caravan and its peers so all see identical token ids.

32 concurrent requests, each prompt exactly 32 tokens of real English text, 128 new tokens each
(EOS ignored), greedy, 2 torch threads. Prompts are windows at different offsets of one built-in
paragraph, tokenized with the model's own `tokenizer.json`: deterministic, and different per request.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

TEXT = (
    "The caravan left the river town before sunrise, while the streets were still wet from the night rain. "
    "Forty camels carried salt, copper pots, bolts of dyed cloth and sealed jars of olive oil, and the drivers "
    "walked beside them in a long, quiet line. The guide, an old woman who had crossed the desert more times "
    "than she could count, watched the sky and the sand and said very little. By noon the heat pressed down "
    "on everything, so the travellers rested in the shade of a rocky ridge and drank sparingly from their "
    "skins. In the afternoon a wind rose from the south and the dunes began to move, slowly erasing the "
    "tracks of those who had passed before. At dusk they reached a well that was marked on no map. The water "
    "was cold and clear, and the children laughed as they filled their cups. That night the drivers told "
    "stories by the fire: of cities buried under the sand, of merchants who grew rich and then lost "
    "everything, and of a star that always points the way home. When the fire burned low, the guide stood "
    "up, looked once more at the stars, and announced that they would leave two hours before dawn, because "
    "the longest stretch of the journey still lay ahead of them and the next well was three days away."
)


@dataclass(frozen=True)
class Workload:
    requests: int = 32
    prompt_len: int = 32
    new_tokens: int = 128
    threads: int = 2


def make_prompts(model_dir: str | Path, n: int = 32, prompt_len: int = 32, seed: int = 0) -> list[list[int]]:
    """`n` prompts of exactly `prompt_len` token ids: windows of the tokenized paragraph at distinct
    offsets chosen by `seed` (the text is repeated if it is too short for `n` distinct windows)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))
    ids = tokenizer.encode(TEXT, add_special_tokens=False).ids
    while len(ids) - prompt_len + 1 < n:
        ids = ids + tokenizer.encode(" " + TEXT, add_special_tokens=False).ids
    offsets = random.Random(seed).sample(range(len(ids) - prompt_len + 1), n)
    return [ids[o : o + prompt_len] for o in offsets]
