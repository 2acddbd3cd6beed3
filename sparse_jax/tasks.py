"""RULER-style synthetic long-context tasks, LongBench-v2 reading, and their scoring.

Task definitions follow RULER (Hsieh et al. 2024, "RULER: What's the real context size of
your long-context LMs?"), with our own haystack: procedurally generated English-like
sentences from the word lists and templates below, in several styles (essay, story, report,
nature, instructions, letters, and RULER's "noise" sentences), so a model cannot memorise
one pattern. Every prompt ends with "\\nAnswer:", for the needle and key-value tasks followed by
RULER's answer prefix that restates the question's key(s) (" The special magic number for {key}
mentioned in the provided text is"); the expected completion is `answer_text` (a leading space,
the answers joined by ", ") followed by EOS.

  niah_single        one needle "One of the special magic numbers for {key} is: {value}." (S-NIAH)
  niah_multikey      4 needles with different keys, one of them is asked for (MK-NIAH)
  niah_multivalue    4 values for one key, all are asked for (MV-NIAH)
  niah_multiquery    4 needles, all 4 keys are asked for (MQ-NIAH)
  variable_tracking  one chain "VAR A = 12345 ... VAR B = VAR A" of 4 hops; all names are asked for (VT)
  common_words       numbered word list, 10 words 30x (6x under 4K tokens), the rest 3x (1x); top 10 (CWE),
                     in the order of their first appearance (num_cw sets how many words are common and asked for)
  kv_lookup          (training) many key-value facts in varied phrasing; one or several questions

Context length is measured in tokens of the model's tokenizer, BOS included: the haystack is
fitted so the prompt is as close to `context_length` as the sentence granularity allows and
never longer. Samples are deterministic per seed. Seeds live in disjoint ranges per split
(`SPLITS`); generating with a seed outside the split's range raises, so evaluation can never
reuse a training sample.

Scoring is RULER's `string_match_all`: the fraction of the expected answers that occur
(case-insensitively) in the prediction; LongBench-v2 is multiple choice, scored by the
extracted letter.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import random
import re
import string
import zlib
from typing import Any, Callable, Iterable, Mapping, Sequence

ANSWER_SUFFIX = "\nAnswer:"
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "variable_tracking",
               "common_words")
NEEDLE_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")
TRAIN_ONLY_TASKS = ("kv_lookup",)
TASKS = RULER_TASKS + TRAIN_ONLY_TASKS

# Disjoint seed ranges (half-open). Sample seeds are drawn inside these ranges only.
SPLITS: dict[str, tuple[int, int]] = {"train": (0, 1 << 40), "eval": (1 << 40, 1 << 41)}

HAYSTACKS = ("filler", "noise", "needle")
STYLES = ("essay", "story", "report", "nature", "instructions", "letters", "noise")


class TaskError(ValueError):
  """A task argument is invalid; the message names the argument and the value."""


class LongBenchFormatError(ValueError):
  """A LongBench-v2 record is malformed; the message names the record (_id or line)."""


# -- seeds and splits ------------------------------------------------------------------

def check_seed(seed: int, split: str) -> int:
  """Returns `seed` if it lies in `split`'s range, else raises TaskError naming both."""
  if split not in SPLITS:
    raise TaskError(f"split={split!r}: expected one of {sorted(SPLITS)}")
  lo, hi = SPLITS[split]
  if not isinstance(seed, int) or isinstance(seed, bool) or not lo <= seed < hi:
    owner = next((name for name, (a, b) in SPLITS.items() if isinstance(seed, int) and a <= seed < b), None)
    where = f" (it belongs to the {owner!r} split)" if owner else ""
    raise TaskError(f"sample seed {seed!r} is outside the {split!r} split range [{lo}, {hi}){where}")
  return seed


def split_seed(split: str, seed: int, index: int = 0, salt: str = "") -> int:
  """The sample seed of sample `index` of a run seeded `seed`, inside `split`'s range.

  `salt` (e.g. "niah_single:4096") gives each task and length its own stream of samples."""
  if split not in SPLITS:
    raise TaskError(f"split={split!r}: expected one of {sorted(SPLITS)}")
  if seed < 0 or index < 0:
    raise TaskError(f"seed={seed} and index={index} must be non-negative")
  lo, hi = SPLITS[split]
  mixed = seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + zlib.crc32(salt.encode()) * 0x94D049BB133111EB
  for _ in range(2):
    mixed = (mixed ^ (mixed >> 31)) * 0xD6E8FEB86659FD93 % (1 << 64)
  return lo + mixed % (hi - lo)


# -- word lists ---------------------------------------------------------------------------

_NOUNS = """
apple anchor arch arrow attic badge bag bakery ball balloon band bank barn barrel basket bay beach beam bean bear
bed bee bell belt bench berry bicycle bird blanket blade boat body bolt bone book boot bottle bowl box branch bread
brick bridge brook brush bucket bundle cabin cable cake camera camp candle canoe canyon cap captain car card carpet
cart castle cat cave cellar chair chalk chapter cheese chest chimney circle city clock cloud coast coat coffee coin
collar comet compass cook copper corner cottage cotton council country court cow crane creek crown cup curtain
cushion dance deck desert desk diamond dinner doctor dog doll door dragon drawer dream drum duck eagle engine
evening fabric face factory farm farmer fence field finger fire fish flag flame flower flute fog forest fork fountain
fox frame friend frog fruit garden gate gift glass glove goat gold grain grape guitar hall hammer harbor hat hawk
hill hive honey horse hospital hotel house island jacket jar jewel journal judge kettle key king kitchen kite knife
ladder lake lamp lantern leaf lemon letter library light lion lock machine map market meadow melon metal mill
mirror moon morning mountain mouse museum needle nest net night ocean office orange orchard owl paint palace
paper parcel park path pencil pepper piano picture pillow pine pipe planet plate pocket poem pond pot potato
puzzle queen rabbit radio rain rainbow raven river road robot rock roof room rope rose sail salt sand school
scarf sea seed shadow sheep shelf shell ship shirt shoe shop signal silver singer sister sky sled snake snow soap
song spoon spring square stable stage star station statue stone storm story stove street string student sugar
summer sun table tail teacher temple tent thread tiger timber tower town toy track train tree truck trumpet
tunnel turtle umbrella valley vase village violin wagon wall wallet watch water wave whale wheel whistle window
wind winter wire wolf wood wool world yard
""".split()
_ADJECTIVES = """
able ancient angry bitter black blue bold brave bright brief broad broken busy calm careful cheap clean clever
cold cool crisp curious dark deep distant dry dull dusty eager early easy elegant empty endless fair famous fancy
fast fierce fine flat fresh friendly frozen gentle giant glad golden good grand gray great green happy hard heavy
hidden high hollow honest hot huge humble icy idle jolly keen kind large late lazy light little lively lonely long
loud lucky mellow mighty mild modern narrow neat new nice noble odd old orange pale patient plain pleasant polite
poor proud purple quick quiet rapid rare raw ready red rich rough round royal rusty sad safe salty sharp shiny short
shy silent silly simple slow small smooth soft solid sour spare steady steep sticky still strange strong sunny
sweet swift tall tame tender thick thin tidy tiny tired tough true velvet vivid warm weak wet white wide wild wise
wooden yellow young
""".split()
# (base, third person, past)
_VERBS = [tuple(v.split("/")) for v in """
accept/accepts/accepted add/adds/added admire/admires/admired answer/answers/answered arrange/arranges/arranged
ask/asks/asked bake/bakes/baked borrow/borrows/borrowed build/builds/built call/calls/called carry/carries/carried
catch/catches/caught change/changes/changed check/checks/checked choose/chooses/chose clean/cleans/cleaned
climb/climbs/climbed close/closes/closed collect/collects/collected count/counts/counted cover/covers/covered
cross/crosses/crossed deliver/delivers/delivered describe/describes/described design/designs/designed
discover/discovers/discovered draw/draws/drew drive/drives/drove enjoy/enjoys/enjoyed explain/explains/explained
explore/explores/explored fill/fills/filled find/finds/found fix/fixes/fixed follow/follows/followed
gather/gathers/gathered guard/guards/guarded guide/guides/guided help/helps/helped hold/holds/held
imagine/imagines/imagined improve/improves/improved inspect/inspects/inspected join/joins/joined
keep/keeps/kept lift/lifts/lifted like/likes/liked listen/listens/listened lose/loses/lost make/makes/made
measure/measures/measured mend/mends/mended move/moves/moved notice/notices/noticed open/opens/opened
paint/paints/painted pass/passes/passed plan/plans/planned plant/plants/planted play/plays/played
polish/polishes/polished prepare/prepares/prepared protect/protects/protected pull/pulls/pulled push/pushes/pushed
reach/reaches/reached read/reads/read remember/remembers/remembered repair/repairs/repaired
return/returns/returned save/saves/saved search/searches/searched see/sees/saw sell/sells/sold send/sends/sent
share/shares/shared show/shows/showed sort/sorts/sorted study/studies/studied test/tests/tested
throw/throws/threw touch/touches/touched trace/traces/traced trust/trusts/trusted use/uses/used
visit/visits/visited wash/washes/washed watch/watches/watched wrap/wraps/wrapped write/writes/wrote
""".split()]
_ADVERBS = """
always barely boldly briskly calmly carefully cheerfully closely eagerly easily evenly fairly firmly freely gently
gladly gracefully happily honestly kindly lightly loudly neatly nearly often openly patiently politely promptly
quickly quietly rarely really safely seldom simply slowly softly steadily swiftly tenderly truly warmly wisely
""".split()
_NAMES = """
Ada Alice Amir Anna Arthur Ben Bella Carlos Chloe Clara Daniel David Dora Elena Emma Ethan Felix Fiona Frank
Grace Hana Hugo Ian Iris Ivan Jack James Jane Julia Kai Karl Laura Leo Lena Liam Lucy Maria Mark Maya Milo
Nadia Nina Noah Olga Oscar Paul Pedro Peter Rosa Ruth Sam Sara Simon Sofia Tara Theo Tom Uma Victor Vera
Walter Wendy Yara Yusuf Zoe
""".split()
_PLACES = """
Ashford Bellport Brookfield Cedarville Clearwater Dunmore Eastwick Elmstead Fairhaven Glenrock Greenhill
Harrowgate Highbury Kingsbridge Lakeside Maplewood Marlow Millbrook Northgate Oakridge Pinecrest Redwater
Riverton Rosedale Saltmarsh Silverton Southport Stonebridge Sunnyvale Thornbury Westfield Whitby Willowmere
""".split()
_NOISE = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.")


def _plural(noun: str) -> str:
  if noun.endswith(("s", "x", "ch", "sh")):
    return noun + "es"
  if noun.endswith("y") and noun[-2] not in "aeiou":
    return noun[:-1] + "ies"
  if noun in ("knife", "leaf", "wolf", "shelf"):
    return noun[:-1].rstrip("f") + "ves"
  return noun + "s"


_SLOTS: dict[str, Callable[[random.Random], str]] = {
    "N": lambda r: r.choice(_NOUNS),
    "Ns": lambda r: _plural(r.choice(_NOUNS)),
    "A": lambda r: r.choice(_ADJECTIVES),
    "V": lambda r: r.choice(_VERBS)[0],
    "Vs": lambda r: r.choice(_VERBS)[1],
    "Vd": lambda r: r.choice(_VERBS)[2],
    "R": lambda r: r.choice(_ADVERBS),
    "P": lambda r: r.choice(_NAMES),
    "L": lambda r: r.choice(_PLACES),
    "Y": lambda r: str(r.randint(1850, 2023)),
    "C": lambda r: str(r.randint(2, 99)),
}

_TEMPLATES = {
    "essay": """
The {A} thing about {Ns} is that they rarely {V} the way you expect.
Most people who {V} {Ns} never stop to ask why.
If you want to {V} a {N}, start by looking at the {Ns} around it.
I used to think that {Ns} were {A}, but now I am not so sure.
It is {R} {A} to {V} a {N} without a {N}.
What matters is not the {N} itself but how you {V} it.
A {A} {N} is worth more than a {A} {N}.
There is a {A} difference between a {N} and a {N}.
Nobody plans to {V} a {N}; it just happens.
The best {Ns} are the ones that {V} {R}.
In the end, every {N} has to {V} something.
You can learn a lot about {Ns} by watching how they {V}.
When a {N} seems {A}, it is usually because nobody has tried to {V} it.
Good ideas often start as {A} {Ns} that people {Vd} too early.
The surprising part is how {R} the {Ns} {V} once you stop worrying.
Ask anyone who has {Vd} a {N} and they will tell you it was {A}.
""",
    "story": """
{P} {Vd} the {A} {N} near the {N}.
After a while, {P} {Vd} to {L} with a {N}.
The {N} was {A}, and {P} {Vd} it {R}.
"We should {V} the {N}," said {P}.
{P} and {P} walked along the {A} road to {L}.
That night the {N} {Vd} {R} behind the {N}.
Nobody in {L} had ever seen such a {A} {N}.
{P} {Vd} for a moment and then {Vd} the {N}.
When the {N} arrived, everyone {Vd} {R}.
Years later, {P} still {Vs} about that {A} {N}.
The {Ns} of {L} were {A} that summer.
{P} kept a {A} {N} in a {N} under the bed.
"Where is the {N}?" asked {P}.
By morning the {A} {N} had {Vd} the whole {N}.
""",
    "report": """
In {Y}, the {N} of {L} {Vd} by {C} percent.
The committee {Vd} {C} {Ns} during the {A} season.
According to the report, {C} {Ns} were {Vd} in {L} last year.
Officials in {L} said the {N} would {V} {R}.
The {A} {N} program began in {Y} with {C} {Ns}.
Prices for {Ns} rose {R} in {L} after {Y}.
Researchers from {L} {Vd} a {A} {N} for {Ns}.
The survey counted {C} {Ns} and {C} {Ns}.
Since {Y}, the {N} has {Vd} {C} new {Ns}.
The council of {L} {Vd} a plan to {V} the {Ns}.
Local {Ns} {Vd} the {A} {N} in {Y}.
""",
    "nature": """
The {A} {N} {Vs} near the river every morning.
In spring, the {Ns} grow and the {Ns} turn {A}.
Wind moves through the {A} {Ns} of the valley.
A {A} {N} rests under the old {N}.
The {Ns} are {A} after the rain.
High above the {N}, a {A} {N} circles {R}.
At dusk the {Ns} fall {A} and still.
The river {Vs} past the {A} {Ns}.
Snow covers the {Ns} and the {A} {N}.
""",
    "instructions": """
First, {V} the {N} {R}.
Then {V} the {A} {N} until it is {A}.
Make sure to {V} each {N} before you {V} the {N}.
Do not {V} the {N} if the {N} is {A}.
Finally, {V} everything and {V} the {Ns}.
Step {C}: {V} the {N} with a {A} {N}.
Keep the {N} {A} and {V} it {R}.
If the {N} is too {A}, {V} it again.
""",
    "letters": """
Dear {P}, I hope the {N} in {L} is {A}.
"Have you seen my {N}?" asked {P}.
"It is {A}," {P} replied, "but the {N} is {A}."
Thank you for the {A} {N} you sent last week.
Please {V} the {Ns} before you leave {L}.
I will {V} the {N} as soon as I can.
With {A} wishes, {P}.
We {Vd} your {N} and found it {A}.
""",
}


def _parse(template: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  parts = re.split(r"\{(\w+)\}", template)
  return tuple(parts[0::2]), tuple(parts[1::2])


_PARSED = {style: [_parse(line) for line in text.strip().splitlines()] for style, text in _TEMPLATES.items()}
_A_AN = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")


def _sentence(rng: random.Random, style: str, noise_index: int = 0) -> str:
  if style == "noise":
    return _NOISE[noise_index % len(_NOISE)]
  literals, slots = rng.choice(_PARSED[style])
  out = [literals[0]]
  for literal, slot in zip(literals[1:], slots):
    out.append(_SLOTS[slot](rng))
    out.append(literal)
  text = _A_AN.sub(r"\1n ", "".join(out))
  for i, ch in enumerate(text):
    if ch.isalpha():
      return text[:i] + ch.upper() + text[i + 1:] if ch.islower() else text
  return text


def _random_key(rng: random.Random) -> str:
  """RULER's word keys: adjective-noun."""
  return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def _random_number(rng: random.Random, digits: int = 7) -> str:
  return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _random_var(rng: random.Random) -> str:
  return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def vocabulary_words() -> list[str]:
  """Every distinct word form of the built-in lists (CWE draws from these), sorted."""
  words = set(_NOUNS) | {_plural(n) for n in _NOUNS} | set(_ADJECTIVES) | set(_ADVERBS)
  for forms in _VERBS:
    words.update(forms)
  return sorted(words)


_CWE_WORDS = vocabulary_words()


def tokenizer_corpus(seed: int = 0, num_sentences: int = 60000) -> list[str]:
  """Deterministic text covering every style and task format (for building the tokenizer)."""
  rng = random.Random(seed)
  texts = []
  lines = []
  for i in range(num_sentences):
    style = STYLES[i % len(STYLES)]
    lines.append(_sentence(rng, style, i))
    if len(lines) == 40:
      texts.append(" ".join(lines))
      lines = []
  texts.append(" ".join(" ".join(_VERBS[i]) for i in range(len(_VERBS))))
  texts.append(" ".join(vocabulary_words() + _NAMES + _PLACES))
  for i in range(3000):
    key, value = _random_key(rng), _random_number(rng)
    texts.append(_NIAH_HEADER[i % 2] + "\n" + _needle(key, value) + " " + _KV_PHRASES[i % len(_KV_PHRASES)].format(
        key=key, value=value) + f" VAR {_random_var(rng)} = {_random_number(rng, 5)}. VAR {_random_var(rng)} = VAR "
                 f"{_random_var(rng)}." + _niah_question([key], i % 2 == 1) + f" {value}" + _kv_question(key) + f" {value}")
  texts.append(_VT_HEADER + _VT_QUESTION.format(value=12345) + _CWE_HEADER + _CWE_QUESTION.format(num_cw=10)
               + _KV_HEADER)
  texts.append(" ".join(f"{i}. {w}" for i, w in enumerate(vocabulary_words(), 1)))
  return texts


# -- tokenizer adapter ----------------------------------------------------------------------

class TokenCounter:
  """Counts tokens of text pieces for any tokenizer.

  Accepts a `tokenizers.Tokenizer` (uses `encode_batch` without special tokens) or anything with
  `encode(str) -> list[int]` (e.g. `models.Tokenizer`; the tokens it adds to every text, such
  as BOS, are measured on the empty string and subtracted). `prompt_length(text)` is the
  length the model sees: `encode(text)` with whatever special tokens the tokenizer adds.
  """

  def __init__(self, tokenizer: Any):
    if tokenizer is None:
      raise TaskError("a tokenizer is required to measure context length (got None)")
    self.tokenizer = tokenizer
    self._raw = hasattr(tokenizer, "encode_batch") and hasattr(tokenizer, "get_vocab_size")
    self._cache: dict[str, list[int]] = {}
    self.special_prefix = len(self.prompt_ids(""))
    self._numbers = self._number_table() if self._raw else None

  def prompt_ids(self, text: str) -> list[int]:
    out = self.tokenizer.encode(text)
    return list(out.ids) if hasattr(out, "ids") else list(out)

  def prompt_length(self, text: str) -> int:
    return len(self.prompt_ids(text))

  def _number_table(self) -> dict[str, int] | None:
    """Ids of digits, space and the punctuation that ends a number chunk, when the tokenizer
    splits digits into single tokens (ours does); None disables the number fast path."""
    table = {}
    for piece in list(string.digits) + [" ", ".", ",", ":", ";"]:
      ids = self.tokenizer.encode(piece, add_special_tokens=False).ids
      if len(ids) != 1:
        return None
      table[piece] = ids[0]
    for probe in (" 1234567.", " 90,", "41:", " 2"):
      if self._number_ids(probe, table) != self.tokenizer.encode(probe, add_special_tokens=False).ids:
        return None
    return table

  @staticmethod
  def _number_ids(chunk: str, table: dict[str, int]) -> list[int]:
    return [table[c] for c in chunk]

  def pieces(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text without special tokens.

    With a byte-level `tokenizers.Tokenizer` a text is split into chunks at every
    non-space -> whitespace transition; no pre-token crosses such a point (tests check the
    result against whole-text encoding), so the ids are the concatenation of the cached ids
    of its chunks (words with their punctuation), and few texts reach the tokenizer."""
    if not self._raw:
      missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
      for t in missing:
        self._cache[t] = self.prompt_ids(t)[self.special_prefix:]
      out = [self._cache[t] for t in texts]
      if len(self._cache) > 100000:
        self._cache.clear()
      return out
    cache = self._cache
    split = [_CHUNK.findall(t) for t in texts]
    numbers = self._numbers
    if numbers is not None:  # numbers are digit tokens: no tokenizer call (and no cache growth)
      for chunks in split:
        for c in chunks:
          if c not in cache and _NUMBER_CHUNK.match(c):
            cache[c] = self._number_ids(c, numbers)
    missing = list(dict.fromkeys(c for chunks in split for c in chunks if c not in cache))
    if missing:
      if len(cache) + len(missing) > 400000:
        cache.clear()
        missing = list(dict.fromkeys(c for chunks in split for c in chunks))
      for c, enc in zip(missing, self.tokenizer.encode_batch(missing, add_special_tokens=False)):
        cache[c] = enc.ids
    out = []
    for chunks in split:
      ids: list[int] = []
      for c in chunks:
        ids += cache[c]
      out.append(ids)
    return out


_CHUNK = re.compile(r"\s*\S+|\s+$")
_NUMBER_CHUNK = re.compile(r" ?\d+[.,:;]?$")


# -- building samples ----------------------------------------------------------------------

_NIAH_HEADER = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the number afterwards.",
                "Some special magic numbers are hidden within the following text. Make sure to memorize it. "
                "I will quiz you about the numbers afterwards.")
_VT_HEADER = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n"
_VT_QUESTION = "\nQuestion: Find all variables that are assigned the value {value} in the text above."
_CWE_HEADER = ("Below is a numbered list of words. In these words, some appear more often than others. "
               "Memorize the ones that appear most often.")
_CWE_QUESTION = "\nQuestion: What are the {num_cw} most common words in the above list?"
_KV_HEADER = ("Some keys and their values are hidden within the following text. Make sure to memorize them. "
              "I will ask you about the values afterwards.")
_KV_PHRASES = ("One of the special magic numbers for {key} is: {value}.", "The value of {key} is {value}.",
               "Remember that {key} maps to {value}.", "{key} = {value}.", "The code for {key} is {value}.",
               "Note: the number for {key} is {value}.")
_KV_QUESTION = "\nQuestion: What is the value of {key}?"


def _kv_question(key: str) -> str:
  return _KV_QUESTION.format(key=key) + ANSWER_SUFFIX + f" The value of {key} is"


def _needle(key: str, value: str) -> str:
  return f"One of the special magic numbers for {key} is: {value}."


def _join_keys(keys: Sequence[str]) -> str:
  return keys[0] if len(keys) == 1 else ", ".join(keys[:-1]) + ", and " + keys[-1]


def _niah_question(keys: Sequence[str], plural: bool) -> str:
  """The question, "\\nAnswer:" and RULER's answer prefix, which repeats the key(s) right before
  the answer (so the key is among the last tokens of the prompt, as in RULER)."""
  if plural:
    return (f"\nWhat are all the special magic numbers for {_join_keys(keys)} mentioned in the provided text?"
            f"{ANSWER_SUFFIX} The special magic numbers for {_join_keys(keys)} mentioned in the provided text are")
  return (f"\nWhat is the special magic number for {keys[0]} mentioned in the provided text?"
          f"{ANSWER_SUFFIX} The special magic number for {keys[0]} mentioned in the provided text is")


def split_answer_prefix(prompt: str) -> tuple[str, str]:
  """(question part, answer prefix) of a task prompt, split at its last "\nAnswer:": a chat
  model gets the first as the user's message and starts its reply with the second, as RULER
  does with chat templates (e.g. "The special magic number for X mentioned in the provided text
  is"; empty when the prompt ends with "Answer:")."""
  cut = prompt.rfind(ANSWER_SUFFIX)
  if cut < 0:
    return prompt, ""
  return prompt[:cut], prompt[cut + len(ANSWER_SUFFIX):].strip()


def answer_text(answers: Sequence[str]) -> str:
  """The completion a perfect model produces after the prompt (before EOS)."""
  return " " + ", ".join(answers)


@dataclasses.dataclass
class Built:
  """One sample as text segments (their concatenation is the prompt) and token ids.

  segments: prompt pieces; ids of each piece are additive (tokenizing the concatenation gives
    the concatenated ids; tests check this), so `prompt_ids` = special prefix + their ids.
  turns: (question text, answers) of each extra question (kv_lookup training turns); the first
    question is part of the prompt.
  """
  task: str
  segments: list[str]
  segment_ids: list[list[int]]
  answers: list[str]
  meta: dict[str, Any]
  turns: list[tuple[str, list[str]]] = dataclasses.field(default_factory=list)
  turn_ids: list[tuple[list[int], list[int]]] = dataclasses.field(default_factory=list)

  @property
  def prompt(self) -> str:
    return "".join(self.segments)

  def num_prompt_tokens(self, special_prefix: int) -> int:
    return special_prefix + sum(len(s) for s in self.segment_ids)


class _Haystack:
  """Filler sentences of one haystack, generated lazily with their token counts."""

  def __init__(self, rng: random.Random, counter: TokenCounter, kind: str, styles: Sequence[str] | None = None,
               exclude_keys: Iterable[str] = ()):
    if kind not in HAYSTACKS:
      raise TaskError(f"haystack={kind!r}: expected one of {HAYSTACKS}")
    self.rng, self.counter, self.kind = rng, counter, kind
    if styles is None:
      pool = [s for s in STYLES if s != "noise"]
      styles = rng.sample(pool, rng.randint(1, 3))
    self.styles = list(styles)
    self.weights = [rng.random() + 0.2 for _ in self.styles]
    self.texts: list[str] = []
    self.ids: list[list[int]] = []
    self._noise = 0
    self.exclude_keys = set(exclude_keys)

  def _make(self) -> str:
    if self.kind == "noise":
      s = _NOISE[self._noise % len(_NOISE)]
      self._noise += 1
      return s
    if self.kind == "needle":
      key = _random_key(self.rng)
      while key in self.exclude_keys:
        key = _random_key(self.rng)
      return _needle(key, _random_number(self.rng))
    style = self.rng.choices(self.styles, self.weights)[0]
    return _sentence(self.rng, style)

  def fill(self, budget: int) -> int:
    """Generates sentences until their tokens exceed `budget`; returns how many fit in it."""
    total = 0
    n = 0
    while True:
      while n >= len(self.texts):
        est = max(8, int((budget - total) / 11) + 8)
        batch = []
        for _ in range(est):
          if self.kind == "noise":  # RULER's noise: the five sentences as one line
            sep = "\n" if self._noise % len(_NOISE) == 0 else " "
          else:
            sep = "\n" if self.kind == "needle" or self.rng.random() < 0.1 else " "
          batch.append(sep + self._make())
        self.texts.extend(batch)
        self.ids.extend(self.counter.pieces(batch))
      if total + len(self.ids[n]) > budget:
        return n
      total += len(self.ids[n])
      n += 1


def _assemble(head: str, sentences: list[str], sentence_ids: list[list[int]], inserts: list[tuple[int, str]],
              tail: str, counter: TokenCounter) -> tuple[list[str], list[list[int]]]:
  """head + sentences with `inserts` (position, text) + tail, as additive segments.

  The first body segment loses its separator (the head ends with a newline)."""
  body: list[str] = []
  by_pos: dict[int, list[str]] = {}
  for pos, text in inserts:
    by_pos.setdefault(pos, []).append(text)
  for i in range(len(sentences) + 1):
    for text in by_pos.get(i, []):
      body.append(" " + text)
    if i < len(sentences):
      body.append(sentences[i])
  if body:
    body[0] = body[0].lstrip(" \n")
  segments = [head] + body + [tail]
  ids = counter.pieces([head]) + [None] * len(body) + counter.pieces([tail])
  known = {s: i for s, i in zip(sentences, sentence_ids)}
  need = [s for s in body if s not in known]
  fresh = dict(zip(need, counter.pieces(need))) if need else {}
  for j, s in enumerate(body):
    ids[1 + j] = known[s] if s in known else fresh[s]
  return segments, ids


def _depth_positions(rng: random.Random, n_sentences: int, n_inserts: int, ordered: bool = True) -> list[int]:
  """Insertion points at random depths (RULER draws from 40 evenly spaced depths; so do we)."""
  depths = [round(100 * i / 39) for i in range(40)]
  chosen = [rng.choice(depths) for _ in range(n_inserts)] if n_inserts > 40 else rng.sample(depths, n_inserts)
  positions = [int(n_sentences * d / 100) for d in chosen]
  return sorted(positions) if ordered else positions


def _fit(counter: TokenCounter, budget_tokens: int, fixed_pieces: Sequence[str], what: str) -> int:
  fixed = sum(len(x) for x in counter.pieces(list(fixed_pieces))) + counter.special_prefix
  room = budget_tokens - fixed
  if room < 0:
    raise TaskError(f"context_length={budget_tokens} is too short for {what}: the prompt without any "
                    f"haystack already takes {fixed} tokens")
  return room


def _build_niah(task: str, rng: random.Random, counter: TokenCounter, budget: int, opts: Mapping[str, Any]) -> Built:
  num_k = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 1, "niah_multiquery": 4}[task]
  num_k = int(opts.get("num_needle_k", num_k))
  num_v = int(opts.get("num_needle_v", 4 if task == "niah_multivalue" else 1))
  num_q = int(opts.get("num_needle_q", num_k if task == "niah_multiquery" else 1))
  if not 1 <= num_q <= num_k:
    raise TaskError(f"num_needle_q={num_q} must be in [1, num_needle_k={num_k}]")
  haystack = opts.get("haystack", "filler")
  keys: list[str] = []
  while len(keys) < num_k:
    k = _random_key(rng)
    if k not in keys:
      keys.append(k)
  values = [[_random_number(rng) for _ in range(num_v)] for _ in keys]
  needles = [(_needle(k, v), ki) for ki, k in enumerate(keys) for v in values[ki]]
  rng.shuffle(needles)
  queried = rng.sample(range(num_k), num_q)
  query_keys = [keys[i] for i in queried]
  # Answers in the order a reader meets them: per queried key, its values in text order.
  order = {text: i for i, (text, _) in enumerate(needles)}
  answers = [v for i in queried for v in sorted(values[i], key=lambda v, i=i: order[_needle(keys[i], v)])]
  plural = num_q * num_v > 1
  head = _NIAH_HEADER[int(plural)] + "\n"
  tail = _niah_question(query_keys, plural)
  extra = [answer_text(answers)] if opts.get("_answer_in_budget") else []
  room = _fit(counter, budget, [head, tail] + [" " + n for n, _ in needles] + extra, task)
  hay = _Haystack(rng, counter, haystack, opts.get("styles"), exclude_keys=keys)
  n = hay.fill(room)
  positions = _depth_positions(rng, n, len(needles))
  segments, ids = _assemble(head, hay.texts[:n], hay.ids[:n], list(zip(positions, [t for t, _ in needles])), tail,
                            counter)
  depth = [p / max(n, 1) for p in positions]
  return Built(task, segments, ids, answers, dict(keys=keys, values=values, query_keys=query_keys, depths=depth,
                                                  haystack=haystack, styles=hay.styles))


def _build_vt(rng: random.Random, counter: TokenCounter, budget: int, opts: Mapping[str, Any]) -> Built:
  num_chains = int(opts.get("num_chains", 1))
  num_hops = int(opts.get("num_hops", 4))
  haystack = opts.get("haystack", "noise")
  names: list[str] = []
  while len(names) < num_chains * (num_hops + 1):
    v = _random_var(rng)
    if v not in names:
      names.append(v)
  chains, values = [], []
  for c in range(num_chains):
    vs = names[c * (num_hops + 1):(c + 1) * (num_hops + 1)]
    value = _random_number(rng, 5)
    while value in values:
      value = _random_number(rng, 5)
    values.append(value)
    chains.append([f"VAR {vs[0]} = {value}."] + [f"VAR {vs[j + 1]} = VAR {vs[j]}." for j in range(num_hops)])
  answers = names[:num_hops + 1]
  head = _VT_HEADER + "\n"
  tail = _VT_QUESTION.format(value=values[0]) + ANSWER_SUFFIX
  statements = [s for chain in chains for s in chain]
  extra = [answer_text(answers)] if opts.get("_answer_in_budget") else []
  room = _fit(counter, budget, [head, tail] + [" " + s for s in statements] + extra, "variable_tracking")
  hay = _Haystack(rng, counter, "noise" if haystack == "noise" else "filler", opts.get("styles"))
  n = hay.fill(room)
  # Each chain keeps its order; chains interleave at random.
  inserts = []
  for chain in chains:
    inserts.extend(zip(sorted(rng.choice(range(n + 1)) for _ in chain), chain))
  inserts.sort(key=lambda x: x[0])
  segments, ids = _assemble(head, hay.texts[:n], hay.ids[:n], inserts, tail, counter)
  return Built("variable_tracking", segments, ids, answers, dict(chains=chains, value=values[0], haystack=haystack))


def _build_cwe(rng: random.Random, counter: TokenCounter, budget: int, opts: Mapping[str, Any]) -> Built:
  num_cw = int(opts.get("num_cw", 10))
  if num_cw < 1:
    raise TaskError(f"num_cw={num_cw} must be at least 1")
  short = budget < 4096
  freq_cw = int(opts.get("freq_cw", 6 if short else 30))
  freq_ucw = int(opts.get("freq_ucw", 1 if short else 3))
  head = _CWE_HEADER + "\n"
  tail = _CWE_QUESTION.format(num_cw=num_cw) + ANSWER_SUFFIX
  pool = list(_CWE_WORDS)
  rng.shuffle(pool)
  # Beyond the built-in forms, compounds keep every word distinct at long contexts.
  def word(i):
    if i < len(pool):
      return pool[i]
    j = i - len(pool)
    return _ADJECTIVES[j % len(_ADJECTIVES)] + _NOUNS[(j // len(_ADJECTIVES) * 7 + j) % len(_NOUNS)]

  word_ids = {}
  def entry_tokens(index: int, w: str) -> int:
    # " {index}. {w}": digits are single tokens, so only the word needs the tokenizer.
    if w not in word_ids:
      word_ids[w] = len(counter.pieces([" " + w])[0])
    return 2 + len(str(index)) + word_ids[w]

  fixed_answer = 0
  if opts.get("_answer_in_budget"):
    fixed_answer = 8 * num_cw
  room = _fit(counter, budget, [head, tail], "common_words") - fixed_answer
  if "freq_cw" not in opts:
    # Short budgets (packed training samples): fewer repeats, keeping common words in the majority.
    while freq_cw > 2 and num_cw * freq_cw * 6 > room * 0.6:
      freq_cw -= 1
  # Grow the distinct-word count while the list still fits.
  num_words, used = num_cw, 0
  for i in range(num_cw):
    for r in range(freq_cw):
      used += entry_tokens(i * freq_cw + r + 1, word(i))
  while True:
    w = word(num_words)
    first = num_cw * freq_cw + (num_words - num_cw) * freq_ucw
    add = sum(entry_tokens(first + r + 1, w) for r in range(freq_ucw))
    if used + add > room:
      break
    used += add
    num_words += 1
  if used > room:
    raise TaskError(f"context_length={budget} is too short for common_words with freq_cw={freq_cw}")
  words = [word(i) for i in range(num_words)]
  common = words[:num_cw]
  listing = common * freq_cw + words[num_cw:] * freq_ucw
  rng.shuffle(listing)
  first_seen = {}
  for i, w in enumerate(listing):
    first_seen.setdefault(w, i)
  answers = sorted(common, key=first_seen.get)
  entries = [f"{i + 1}. {w}" if i == 0 else f" {i + 1}. {w}" for i, w in enumerate(listing)]
  segments = [head] + entries + [tail]
  ids = counter.pieces(segments)
  return Built("common_words", segments, ids, answers, dict(num_words=num_words, freq_cw=freq_cw,
                                                            freq_ucw=freq_ucw))


def _build_kv(rng: random.Random, counter: TokenCounter, budget: int, opts: Mapping[str, Any]) -> Built:
  num_turns = int(opts.get("num_turns", 1))
  # Denser facts at longer contexts: about one per 300 tokens, at least 4.
  num_pairs = int(opts.get("num_pairs", max(4, min(256, budget // rng.choice((150, 300, 600))))))
  num_turns = min(num_turns, num_pairs)
  keys: list[str] = []
  while len(keys) < num_pairs:
    k = _random_key(rng)
    if k not in keys:
      keys.append(k)
  values = [_random_number(rng) for _ in keys]
  phrase_mix = rng.sample(_KV_PHRASES, rng.randint(1, len(_KV_PHRASES)))
  facts = [rng.choice(phrase_mix).format(key=k, value=v) for k, v in zip(keys, values)]
  asked = rng.sample(range(num_pairs), num_turns)
  head = _KV_HEADER + "\n"
  tail = _kv_question(keys[asked[0]])
  turns = [(_kv_question(keys[i]), [values[i]]) for i in asked[1:]]
  extra = [answer_text([values[i]]) for i in asked] + [q for q, _ in turns] if opts.get("_answer_in_budget") else []
  room = _fit(counter, budget, [head, tail] + [" " + f for f in facts] + extra, "kv_lookup")
  hay = _Haystack(rng, counter, opts.get("haystack", "filler"), opts.get("styles"))
  n = hay.fill(room)
  positions = [rng.randint(0, n) for _ in facts]
  segments, ids = _assemble(head, hay.texts[:n], hay.ids[:n], sorted(zip(positions, facts)), tail, counter)
  built = Built("kv_lookup", segments, ids, [values[asked[0]]], dict(keys=keys, values=values))
  built.turns = turns
  built.turn_ids = [(counter.pieces([q])[0], counter.pieces([answer_text(a)])[0]) for q, a in turns]
  return built


_BUILDERS = {
    "niah_single": lambda r, c, b, o: _build_niah("niah_single", r, c, b, o),
    "niah_multikey": lambda r, c, b, o: _build_niah("niah_multikey", r, c, b, o),
    "niah_multivalue": lambda r, c, b, o: _build_niah("niah_multivalue", r, c, b, o),
    "niah_multiquery": lambda r, c, b, o: _build_niah("niah_multiquery", r, c, b, o),
    "variable_tracking": _build_vt,
    "common_words": _build_cwe,
    "kv_lookup": _build_kv,
}

_OPTIONS = {"haystack", "styles", "num_needle_k", "num_needle_v", "num_needle_q", "num_chains", "num_hops", "num_cw",
            "freq_cw", "freq_ucw", "num_pairs", "num_turns", "_answer_in_budget"}


def build(task: str, context_length: int, seed: int, tokenizer: Any, *, split: str = "eval",
          counter: TokenCounter | None = None, **options: Any) -> Built:
  """The sample of `task` for `seed` (which must lie in `split`'s range), fitted to
  `context_length` tokens. `options` override RULER's defaults (see _OPTIONS)."""
  if task not in _BUILDERS:
    raise TaskError(f"unknown task {task!r}; expected one of {TASKS}")
  if not isinstance(context_length, int) or context_length <= 0:
    raise TaskError(f"context_length={context_length!r} must be a positive integer")
  unknown = sorted(set(options) - _OPTIONS)
  if unknown:
    raise TaskError(f"unknown option(s) {unknown} for task {task!r}; allowed: {sorted(_OPTIONS - {'_answer_in_budget'})}")
  check_seed(seed, split)
  counter = counter or TokenCounter(tokenizer)
  rng = random.Random(seed)
  built = _BUILDERS[task](rng, counter, context_length, options)
  # Separators dropped at the head/body seam can cost a token or two: trim filler to fit.
  extra = 0
  if options.get("_answer_in_budget"):
    extra = len(counter.pieces([answer_text(built.answers)])[0]) + sum(len(q) + len(a) for q, a in built.turn_ids)
  while built.num_prompt_tokens(counter.special_prefix) + extra > context_length:
    body = [i for i in range(1, len(built.segments) - 1) if not _is_needle(built.segments[i], built)]
    if not body or task == "common_words":
      raise TaskError(f"context_length={context_length} is too short for {task}")
    i = body[-1]
    del built.segments[i], built.segment_ids[i]
  built.meta.update(seed=seed, split=split)
  return built


def generate_sample(task: str, context_length: int, seed: int, tokenizer: Any, *, split: str = "eval",
                    counter: TokenCounter | None = None, **options: Any) -> dict[str, Any]:
  """One sample as a dict: task, context_length (target), prompt, answers, answer_text,
  num_prompt_tokens (measured by encoding the prompt), seed, split, and task metadata."""
  counter = counter or TokenCounter(tokenizer)
  built = build(task, context_length, seed, tokenizer, split=split, counter=counter, **options)
  prompt = built.prompt
  n = counter.prompt_length(prompt)
  expected = built.num_prompt_tokens(counter.special_prefix)
  if n != expected or n > context_length:
    # Our segments tokenize additively with the shipped tokenizer; any other tokenizer may merge
    # across a boundary, so trim filler from the end of the haystack until the prompt fits.
    while n > context_length:
      body = [i for i, s in enumerate(built.segments[1:-1], 1) if not _is_needle(s, built)]
      if not body:
        raise TaskError(f"cannot fit {task} into context_length={context_length} with this tokenizer")
      del built.segments[body[-1]], built.segment_ids[body[-1]]
      prompt = built.prompt
      n = counter.prompt_length(prompt)
  return dict(task=task, context_length=context_length, prompt=prompt, answers=list(built.answers),
              answer_text=answer_text(built.answers), num_prompt_tokens=n, **built.meta)


def _is_needle(segment: str, built: Built) -> bool:
  if built.task == "common_words":
    return False
  markers = [str(v) for vs in built.meta.get("values", []) for v in (vs if isinstance(vs, list) else [vs])]
  markers += ["VAR "]
  return any(m in segment for m in markers)


def generate_samples(task: str, context_length: int, num_samples: int, seed: int, tokenizer: Any, *,
                     split: str = "eval", **options: Any) -> list[dict[str, Any]]:
  """`num_samples` samples; sample i uses `split_seed(split, seed, i, f"{task}:{context_length}")`."""
  counter = TokenCounter(tokenizer)
  salt = f"{task}:{context_length}"
  return [generate_sample(task, context_length, split_seed(split, seed, i, salt), tokenizer, split=split,
                          counter=counter, **options) for i in range(num_samples)]


# -- scoring ------------------------------------------------------------------------------------

def score(prediction: str, answers: Sequence[str]) -> float:
  """RULER's string_match_all: fraction of `answers` contained (case-insensitively) in `prediction`."""
  if isinstance(answers, str):
    answers = [answers]
  if not answers:
    raise TaskError("answers is empty")
  pred = prediction.lower()
  return sum(1.0 for a in answers if a.lower() in pred) / len(answers)


# -- LongBench-v2 ----------------------------------------------------------------------------------

LONGBENCH_FIELDS = ("_id", "domain", "sub_domain", "difficulty", "length", "question", "choice_A", "choice_B",
                    "choice_C", "choice_D", "answer", "context")
LONGBENCH_TEMPLATE = """Please read the following text and answer the question below.

<text>
{context}
</text>

What is the correct answer to this question: {question}
Choices:
(A) {choice_A}
(B) {choice_B}
(C) {choice_C}
(D) {choice_D}

Format your response as follows: "The correct answer is (insert answer here)"."""


LONGBENCH_DIFFICULTIES = ("easy", "hard")
LONGBENCH_LENGTHS = ("short", "medium", "long")


def read_longbench_v2(path: str | os.PathLike, *, difficulty: str | None = None,
                      length: str | None = None) -> list[dict[str, Any]]:
  """Records of a LongBench-v2 file, validated: the release's JSON array (data.json) or JSONL.

  difficulty ("easy" / "hard") and length ("short" / "medium" / "long") keep only the matching
  records. A record that is not an object, a missing field or an answer outside A-D raises
  LongBenchFormatError naming the record's _id (or its position when it has none)."""
  path = os.fspath(path)
  if difficulty is not None and difficulty not in LONGBENCH_DIFFICULTIES:
    raise LongBenchFormatError(f"difficulty={difficulty!r}: expected one of {LONGBENCH_DIFFICULTIES}")
  if length is not None and length not in LONGBENCH_LENGTHS:
    raise LongBenchFormatError(f"length={length!r}: expected one of {LONGBENCH_LENGTHS}")
  if not os.path.exists(path):
    raise LongBenchFormatError(f"LongBench-v2 file not found: {path}")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  if text.lstrip().startswith("["):
    try:
      items = json.loads(text)
    except json.JSONDecodeError as e:
      raise LongBenchFormatError(f"{path}: not a valid JSON array ({e})") from None
    located = [(f"record {i}", rec) for i, rec in enumerate(items)]
  else:
    located = []
    for lineno, line in enumerate(text.splitlines(), 1):
      if not line.strip():
        continue
      try:
        located.append((f"line {lineno}", json.loads(line)))
      except json.JSONDecodeError as e:
        raise LongBenchFormatError(f"{path}: line {lineno} is not valid JSON ({e})") from None
  records = []
  for where, rec in located:
    if not isinstance(rec, dict):
      raise LongBenchFormatError(f"{path}: {where} is not a JSON object")
    name = f"record _id={rec['_id']!r} ({where})" if "_id" in rec else f"record at {where}"
    missing = [k for k in LONGBENCH_FIELDS if k not in rec]
    if missing:
      raise LongBenchFormatError(f"{path}: {name} lacks field(s) {missing}")
    if rec["answer"] not in ("A", "B", "C", "D"):
      raise LongBenchFormatError(f"{path}: {name} has answer={rec['answer']!r}; expected one of A, B, C, D")
    if (difficulty is None or rec["difficulty"] == difficulty) and (length is None or rec["length"] == length):
      records.append(rec)
  return records


def longbench_v2_prompt(record: Mapping[str, Any], counter: TokenCounter | None = None,
                        max_prompt_tokens: int | None = None) -> str:
  """LongBench-v2's 0-shot prompt. With a token limit, the context is truncated in the middle
  (LongBench keeps the first and last halves) until the whole prompt fits."""
  fields = {k: record[k] for k in ("question", "choice_A", "choice_B", "choice_C", "choice_D")}
  prompt = LONGBENCH_TEMPLATE.format(context=record["context"], **fields)
  if counter is None or max_prompt_tokens is None:
    return prompt
  total = counter.prompt_length(prompt)
  if total <= max_prompt_tokens:
    return prompt
  ctx_ids = counter.pieces([record["context"]])[0]
  overhead = total - len(ctx_ids)
  keep = max_prompt_tokens - overhead
  if keep <= 0:
    raise TaskError(f"max_prompt_tokens={max_prompt_tokens} leaves no room for the context of record "
                    f"{record.get('_id')!r} (the rest of the prompt takes {overhead} tokens)")
  decode = counter.tokenizer.decode
  while True:
    half = keep // 2
    context = decode(ctx_ids[:half]) + decode(ctx_ids[len(ctx_ids) - (keep - half):])
    prompt = LONGBENCH_TEMPLATE.format(context=context, **fields)
    if counter.prompt_length(prompt) <= max_prompt_tokens or keep <= 1:
      return prompt
    keep -= max(1, counter.prompt_length(prompt) - max_prompt_tokens)


_LB_PATTERNS = (re.compile(r"The correct answer is \(([A-D])\)"), re.compile(r"The correct answer is ([A-D])"))


def extract_choice(prediction: str) -> str | None:
  """The letter a response picks, as LongBench-v2's reference code (pred.py, extract_answer) reads
  it: asterisks removed, then "The correct answer is (X)", else "The correct answer is X"; None
  otherwise (scored wrong)."""
  text = prediction.replace("*", "")
  for pattern in _LB_PATTERNS:
    m = pattern.search(text)
    if m:
      return m.group(1)
  return None


def score_choice(prediction: str, answer: str) -> float:
  return 1.0 if extract_choice(prediction) == answer else 0.0


# -- tokenizer ------------------------------------------------------------------------------------

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2


@functools.lru_cache(maxsize=4)
def build_tokenizer(vocab_size: int = 4096, corpus_seed: int = 0):
  """A byte-level BPE `tokenizers.Tokenizer` trained on `tokenizer_corpus(corpus_seed)`.

  Digits are split into single tokens before BPE, so numbers are always digit sequences.
  Byte-level pre-tokenization round-trips any text. Ids 0, 1, 2 are <|pad|>, <|bos|>, <|eos|>;
  the post-processor prepends <|bos|> (as `transformers` tokenizers do with
  add_special_tokens=True). Deterministic: the same arguments give the same tokenizer.json.
  Cached per arguments (treat the result as read-only).
  """
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  if vocab_size < 300:
    raise TaskError(f"vocab_size={vocab_size} must be at least 300 (256 bytes + specials + merges)")
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  tok.train_from_iterator(tokenizer_corpus(corpus_seed), trainer)
  tok.post_processor = processors.TemplateProcessing(single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B",
                                                     special_tokens=[(BOS_TOKEN, 1)])
  for i, t in enumerate(SPECIAL_TOKENS):
    if tok.token_to_id(t) != i:
      raise RuntimeError(f"special token {t!r} got id {tok.token_to_id(t)}, expected {i}")
  return tok
