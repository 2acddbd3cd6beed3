"""RULER-style task generators, scoring, seed splits, tokenizer and LongBench-v2 reading."""
import collections
import json
import re

import pytest

from sparse_jax import tasks


@pytest.fixture(scope="module")
def tok():
  return tasks.build_tokenizer()


def _seed(i=0, split="eval"):
  return tasks.split_seed(split, 0, i, "test")


@pytest.mark.parametrize("task", tasks.TASKS)
def test_deterministic_per_seed_and_seeds_differ(tok, task):
  a = tasks.generate_sample(task, 768, _seed(0), tok)
  b = tasks.generate_sample(task, 768, _seed(0), tok)
  c = tasks.generate_sample(task, 768, _seed(1), tok)
  assert a == b
  assert a["prompt"] != c["prompt"]
  assert a["answers"] != c["answers"]


@pytest.mark.parametrize("task", tasks.TASKS)
@pytest.mark.parametrize("length", [400, 5000])
def test_prompt_fits_close_to_target(tok, task, length):
  for i in range(2):
    s = tasks.generate_sample(task, length, _seed(i), tok)
    n = len(tok.encode(s["prompt"]).ids)  # BOS included, as the model sees it
    assert n == s["num_prompt_tokens"]
    assert n <= length
    assert n >= length - max(40, length // 100), (task, length, n)
    assert tasks.ANSWER_SUFFIX in s["prompt"] and "\n" not in s["prompt"].rsplit(tasks.ANSWER_SUFFIX, 1)[1]
    assert s["context_length"] == length and s["task"] == task


@pytest.mark.parametrize("task", tasks.TASKS)
def test_segments_tokenize_additively(tok, task):
  """Training builds token ids from per-segment ids; they must equal encoding the whole prompt."""
  counter = tasks.TokenCounter(tok)
  for i, haystack in enumerate(tasks.HAYSTACKS):
    opts = {"haystack": haystack} if task not in ("common_words", "variable_tracking") or haystack == "noise" else {}
    built = tasks.build(task, 700 + 400 * i, _seed(i, "train"), tok, split="train", counter=counter, **opts)
    ids = [1] + [t for seg in built.segment_ids for t in seg]  # BOS + segments
    assert tok.encode(built.prompt).ids == ids


def test_needles_and_answers(tok):
  s = tasks.generate_sample("niah_single", 1024, _seed(), tok)
  assert len(s["answers"]) == 1 and re.fullmatch(r"\d{7}", s["answers"][0])
  key = s["query_keys"][0]
  assert f"One of the special magic numbers for {key} is: {s['answers'][0]}." in s["prompt"]
  assert s["prompt"].count("special magic numbers for") == 1

  mk = tasks.generate_sample("niah_multikey", 1024, _seed(), tok)
  assert mk["prompt"].count("One of the special magic numbers for") == 4
  assert len(mk["answers"]) == 1 and mk["answers"][0] in mk["prompt"]

  mv = tasks.generate_sample("niah_multivalue", 1024, _seed(), tok)
  key = mv["query_keys"][0]
  found = re.findall(rf"magic numbers for {key} is: (\d+)\.", mv["prompt"])
  assert found == mv["answers"] and len(found) == 4  # answers in text order

  mq = tasks.generate_sample("niah_multiquery", 1024, _seed(), tok)
  assert len(mq["query_keys"]) == 4 and len(mq["answers"]) == 4
  for key, value in zip(mq["query_keys"], mq["answers"]):
    assert f"for {key} is: {value}." in mq["prompt"]
    assert key in mq["prompt"].rsplit("\n", 2)[-2]  # every key is asked for


def test_variable_tracking_chain(tok):
  s = tasks.generate_sample("variable_tracking", 2048, _seed(), tok)
  names = s["answers"]
  assert len(names) == 5
  value = re.search(rf"VAR {names[0]} = (\d+)\.", s["prompt"]).group(1)
  assert f"assigned the value {value} in the text above" in s["prompt"]
  for prev, cur in zip(names, names[1:]):
    assert f"VAR {cur} = VAR {prev}." in s["prompt"]
  positions = [s["prompt"].index(f"VAR {n} =") for n in names]
  assert positions == sorted(positions)


@pytest.mark.parametrize("length,freq", [(2048, 6), (5000, 30)])
def test_common_words_frequencies(tok, length, freq):
  s = tasks.generate_sample("common_words", length, _seed(), tok)
  body = s["prompt"].split("\n")[1]
  words = re.findall(r"\d+\. (\S+)", body)
  counts = collections.Counter(words)
  assert [int(n) for n in re.findall(r"(\d+)\. ", body)] == list(range(1, len(words) + 1))
  assert len(s["answers"]) == 10
  assert all(counts[w] == freq for w in s["answers"])
  assert sorted(counts.values())[-11] < freq  # exactly 10 words reach the top frequency


def test_common_words_count_option(tok):
  """num_cw sets how many words are common and asked for; the question names that count."""
  s = tasks.generate_sample("common_words", 1024, _seed(), tok, num_cw=3, freq_cw=8, freq_ucw=2)
  body = s["prompt"].split("\n")[1]
  counts = collections.Counter(re.findall(r"\d+\. (\S+)", body))
  assert len(s["answers"]) == 3 and all(counts[w] == 8 for w in s["answers"])
  assert sorted(counts.values())[-4] == 2
  assert "What are the 3 most common words in the above list?" in s["prompt"]
  first = {w: body.index(f". {w} ") if f". {w} " in body else body.index(f". {w}") for w in s["answers"]}
  assert s["answers"] == sorted(s["answers"], key=first.get)
  default = tasks.generate_sample("common_words", 1024, _seed(), tok)
  assert "What are the 10 most common words in the above list?" in default["prompt"]
  with pytest.raises(tasks.TaskError, match="num_cw"):
    tasks.generate_sample("common_words", 1024, _seed(), tok, num_cw=0)


def test_kv_lookup_training_turns(tok):
  built = tasks.build("kv_lookup", 3000, _seed(0, "train"), tok, split="train", num_turns=5)
  assert len(built.turns) == 4 and len(built.turn_ids) == 4
  for question, answers in built.turns:
    key = re.search(r"value of (\S+)\?", question).group(1)
    assert key in built.prompt and answers[0] in built.prompt


def test_training_budget_includes_answers(tok):
  counter = tasks.TokenCounter(tok)
  for task in tasks.TASKS:
    b = tasks.build(task, 900, _seed(0, "train"), tok, split="train", counter=counter, _answer_in_budget=True)
    answer = len(counter.pieces([tasks.answer_text(b.answers)])[0])
    extra = sum(len(q) + len(a) for q, a in b.turn_ids)
    assert b.num_prompt_tokens(1) + answer + extra <= 900


def test_score_string_match_all():
  assert tasks.score(" 1234567", ["1234567"]) == 1.0
  assert tasks.score(" 7654321", ["1234567"]) == 0.0
  assert tasks.score("the numbers are 1, 2", ["1", "2", "3", "4"]) == 0.5
  assert tasks.score("ALPHA beta", ["alpha", "Beta"]) == 1.0
  assert tasks.score("", ["x"]) == 0.0
  with pytest.raises(tasks.TaskError):
    tasks.score("x", [])


def test_perfect_answer_text_scores_one(tok):
  for task in tasks.RULER_TASKS:
    s = tasks.generate_sample(task, 1024, _seed(), tok)
    assert tasks.score(s["answer_text"], s["answers"]) == 1.0
    assert tasks.score(" nothing here", s["answers"]) == 0.0


def test_seed_splits_are_disjoint_and_enforced(tok):
  (tlo, thi), (elo, ehi) = tasks.SPLITS["train"], tasks.SPLITS["eval"]
  assert thi <= elo or ehi <= tlo
  for i in range(200):
    assert tlo <= tasks.split_seed("train", 3, i, "x") < thi
    assert elo <= tasks.split_seed("eval", 3, i, "x") < ehi
  train_seed = tasks.split_seed("train", 0, 0)
  with pytest.raises(tasks.TaskError, match="outside the 'eval' split.*belongs to the 'train'"):
    tasks.generate_sample("niah_single", 512, train_seed, tok, split="eval")
  with pytest.raises(tasks.TaskError, match="outside the 'train' split"):
    tasks.build("niah_single", 512, tasks.split_seed("eval", 0, 0), tok, split="train")
  with pytest.raises(tasks.TaskError, match="split='test'"):
    tasks.check_seed(5, "test")
  samples = tasks.generate_samples("niah_single", 512, 3, 0, tok)
  assert all(elo <= s["seed"] < ehi and s["split"] == "eval" for s in samples)


def test_bad_arguments_name_the_value(tok):
  with pytest.raises(tasks.TaskError, match="unknown task 'niah_x'"):
    tasks.generate_sample("niah_x", 512, _seed(), tok)
  with pytest.raises(tasks.TaskError, match="unknown option"):
    tasks.generate_sample("niah_single", 512, _seed(), tok, needles=3)
  with pytest.raises(tasks.TaskError, match="too short"):
    tasks.generate_sample("niah_multiquery", 40, _seed(), tok)
  with pytest.raises(tasks.TaskError, match="haystack='essay'"):
    tasks.generate_sample("niah_single", 512, _seed(), tok, haystack="essay")


def test_tokenizer_deterministic_round_trip_digits(tok):
  assert tasks.build_tokenizer.__wrapped__().to_str() == tok.to_str()  # a fresh build, not the cache
  assert tok.get_vocab_size() == 4096
  assert [tok.token_to_id(t) for t in tasks.SPECIAL_TOKENS] == [0, 1, 2]
  text = tasks.generate_sample("niah_multivalue", 600, _seed(), tok)["prompt"] + " 1234567\n\n  odd  spacing é ✓"
  enc = tok.encode(text)
  assert enc.ids[0] == 1
  assert tok.decode(enc.ids) == text
  digits = tok.encode(" 9081726", add_special_tokens=False).tokens
  assert digits[1:] == list("9081726")


def test_generic_tokenizer_interface(tok):
  """Anything with encode(str) -> ids works (e.g. models.Tokenizer, which adds BOS itself)."""

  class Plain:
    def encode(self, text):
      return [1] + tok.encode(text, add_special_tokens=False).ids

  s = tasks.generate_sample("niah_single", 700, _seed(), Plain())
  assert s == tasks.generate_sample("niah_single", 700, _seed(), tok)


def _lb_record(**kw):
  rec = dict(_id="rec-1", domain="Single-Document QA", sub_domain="Financial", difficulty="easy", length="short",
             question="Which colour is the sky?", choice_A="red", choice_B="blue", choice_C="green",
             choice_D="black", answer="B", context="The sky is blue. " * 20)
  rec.update(kw)
  return rec


def _write_jsonl(path, records):
  with open(path, "w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")
  return str(path)


def test_longbench_v2_reader_and_prompt(tok, tmp_path):
  path = _write_jsonl(tmp_path / "lb.jsonl", [_lb_record(), _lb_record(_id="rec-2", answer="D")])
  recs = tasks.read_longbench_v2(path)
  assert [r["_id"] for r in recs] == ["rec-1", "rec-2"]
  prompt = tasks.longbench_v2_prompt(recs[0])
  assert "<text>\nThe sky is blue." in prompt
  assert "What is the correct answer to this question: Which colour is the sky?" in prompt
  assert "(A) red\n(B) blue\n(C) green\n(D) black" in prompt
  counter = tasks.TokenCounter(tok)
  full = counter.prompt_length(prompt)
  short = tasks.longbench_v2_prompt(recs[0], counter, full - 40)
  assert full - 45 <= counter.prompt_length(short) <= full - 40
  assert short.count("The sky is blue.") < prompt.count("The sky is blue.")
  with pytest.raises(tasks.TaskError, match="leaves no room for the context of record 'rec-1'"):
    tasks.longbench_v2_prompt(recs[0], counter, 50)
  assert short.startswith("Please read") and short.endswith('"The correct answer is (insert answer here)".')
  assert tasks.extract_choice("The correct answer is (B)") == "B"
  assert tasks.extract_choice("**The correct answer is C**") == "C"
  assert tasks.extract_choice(" (D) black") is None  # LongBench-v2's extract_answer needs its sentence
  assert tasks.extract_choice("I am not sure") is None
  assert tasks.score_choice("The correct answer is (B)", "B") == 1.0
  assert tasks.score_choice("The correct answer is (A)", "B") == 0.0


def test_longbench_v2_errors_name_the_record(tmp_path):
  missing = _lb_record(_id="broken-7")
  del missing["choice_C"]
  with pytest.raises(tasks.LongBenchFormatError, match=r"_id='broken-7'.*choice_C"):
    tasks.read_longbench_v2(_write_jsonl(tmp_path / "a.jsonl", [_lb_record(), missing]))
  with pytest.raises(tasks.LongBenchFormatError, match=r"_id='bad-letter'.*answer='E'"):
    tasks.read_longbench_v2(_write_jsonl(tmp_path / "b.jsonl", [_lb_record(_id="bad-letter", answer="E")]))
  no_id = _lb_record()
  del no_id["_id"]
  with pytest.raises(tasks.LongBenchFormatError, match=r"record at line 2 lacks field\(s\) \['_id'\]"):
    tasks.read_longbench_v2(_write_jsonl(tmp_path / "c.jsonl", [_lb_record(), no_id]))
  (tmp_path / "d.jsonl").write_text('{"_id": "x"\n')
  with pytest.raises(tasks.LongBenchFormatError, match="line 1 is not valid JSON"):
    tasks.read_longbench_v2(str(tmp_path / "d.jsonl"))


def test_longbench_v2_release_json_array_and_filters(tmp_path):
  """The release's data.json is one JSON array; --difficulty / --length pick records as its
  result table's categories do."""
  recs = [_lb_record(_id="e-s", difficulty="easy", length="short"), _lb_record(_id="h-l", difficulty="hard", length="long"),
          _lb_record(_id="h-m", difficulty="hard", length="medium")]
  path = tmp_path / "data.json"
  path.write_text(json.dumps(recs, indent=1))
  assert [r["_id"] for r in tasks.read_longbench_v2(path)] == ["e-s", "h-l", "h-m"]
  assert [r["_id"] for r in tasks.read_longbench_v2(path, difficulty="hard")] == ["h-l", "h-m"]
  assert [r["_id"] for r in tasks.read_longbench_v2(path, difficulty="hard", length="long")] == ["h-l"]
  assert tasks.read_longbench_v2(_write_jsonl(tmp_path / "x.jsonl", recs), length="short")[0]["_id"] == "e-s"
  with pytest.raises(tasks.LongBenchFormatError, match="length='huge'"):
    tasks.read_longbench_v2(path, length="huge")
  broken = [dict(recs[0]), {k: v for k, v in recs[1].items() if k != "question"}]
  path.write_text(json.dumps(broken))
  with pytest.raises(tasks.LongBenchFormatError, match=r"_id='h-l' \(record 1\) lacks field\(s\) \['question'\]"):
    tasks.read_longbench_v2(path)
  path.write_text('[{"_id": 1},')
  with pytest.raises(tasks.LongBenchFormatError, match="not a valid JSON array"):
    tasks.read_longbench_v2(path)
