"""models.tokenizer against transformers.AutoTokenizer on every checkpoint layout: BOS/EOS from the
post-processor or tokenizer_config.json, special and added tokens, decoding, chat templates from
chat_template.jinja / chat_template.json / tokenizer_config.json, generation_config.json."""
import json
import os
import shutil

import pytest

transformers = pytest.importorskip("transformers")

import models
from models import ChatTemplateError
from sparse_jax.defaults import DEFAULT_MODEL_DIR
from sparse_jax.serve import stream_safe_prefix

TEXTS = ["Hello world, this is a test.", "  leading spaces and <|eos|> inside", "numbers 12345 and\nnew lines\t!",
         "unicode: caf\u00e9 \u4e2d\u6587 \U0001F600", ""]
BOS_POST = {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": "<|bos|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|bos|>": {"id": "<|bos|>", "ids": [1], "tokens": ["<|bos|>"]}}}
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
RICH = ("{{ bos_token }}{% if tools %}Tools: {{ tools | tojson }}\n{% endif %}Today: {{ strftime_now('%Y') }}\n"
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tool turns') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3? \u00e9\U0001F600"}]
TOOLS = [{"type": "function", "function": {"name": "add", "description": "adds", "parameters": {
    "type": "object", "properties": {"a": {"type": "number"}}, "required": ["a"]}}}]


def write_layout(root, name, *, config_update=None, config_drop=(), post_processor="keep", chat_template_file=None,
                 chat_template_json=None, generation_config=None):
  """The embedded model's tokenizer in another checkpoint layout."""
  path = os.path.join(str(root), name)
  os.makedirs(path)
  tok = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "tokenizer.json")))
  if post_processor != "keep":
    tok["post_processor"] = post_processor
  json.dump(tok, open(os.path.join(path, "tokenizer.json"), "w"))
  cfg = json.load(open(os.path.join(DEFAULT_MODEL_DIR, "tokenizer_config.json")))
  cfg.update(config_update or {})
  for key in config_drop:
    cfg.pop(key, None)
  json.dump(cfg, open(os.path.join(path, "tokenizer_config.json"), "w"))
  if chat_template_file is not None:
    open(os.path.join(path, "chat_template.jinja"), "w").write(chat_template_file)
  if chat_template_json is not None:
    json.dump({"chat_template": chat_template_json}, open(os.path.join(path, "chat_template.json"), "w"))
  if generation_config is not None:
    json.dump(generation_config, open(os.path.join(path, "generation_config.json"), "w"))
  return path


# name -> write_layout kwargs. "llama3" is the failing case: BOS only in the post-processor.
LAYOUTS = {
    "shipped": {},
    "llama3": dict(config_drop=("add_bos_token", "add_eos_token")),
    "post_bos_config_false": dict(config_update={"add_bos_token": False}),
    "no_bos_anywhere": dict(config_drop=("add_bos_token",), post_processor=None),
    "added_tokens_in_config_only": dict(config_update={
        "eos_token": "<|end_of_turn|>", "extra_special_tokens": ["<|tool|>"],
        "added_tokens_decoder": {"4096": {"content": "<|user|>", "special": True, "normalized": False,
                                          "lstrip": False, "rstrip": False, "single_word": False}}}),
    "cleanup_spaces": dict(config_update={"clean_up_tokenization_spaces": True}),
}


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
  root = tmp_path_factory.mktemp("layouts")
  return {name: write_layout(root, name, **kw) for name, kw in LAYOUTS.items()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_encode_decode_equal_autotokenizer(layouts, layout):
  ours = models.load_tokenizer(layouts[layout])
  ref = transformers.AutoTokenizer.from_pretrained(layouts[layout])
  texts = TEXTS + ["<|user|> hi <|tool|> there <|end_of_turn|>"]
  for text in texts:
    ids = ours.encode(text)
    assert ids == ref(text).input_ids, (layout, text)
    assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False).input_ids
    for skip in (True, False):
      assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (layout, text)
  assert ours.bos_token_id == ref.bos_token_id
  assert ref.eos_token_id in ours.eos_token_ids
  assert ours.vocab_size == len(ref)


def test_bos_comes_from_the_post_processor(layouts):
  """Llama-3 checkpoints add BOS in tokenizer.json's post-processor and say nothing in tokenizer_config.json."""
  assert models.load_tokenizer(layouts["llama3"]).encode("hi")[0] == 1
  assert models.load_tokenizer(layouts["no_bos_anywhere"]).encode("hi")[0] != 1


def test_add_bos_and_eos_from_tokenizer_config_when_tokenizer_json_has_no_post_processor(tmp_path):
  path = write_layout(tmp_path, "flags", post_processor=None, config_update={"add_bos_token": True, "add_eos_token": True})
  tok = models.load_tokenizer(path)
  ids = tok.encode("hello")
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.encode("hello", add_special_tokens=False) == ids[1:-1]
  assert tok.decode(ids) == "hello"


@pytest.mark.parametrize("where", ["jinja", "json", "tokenizer_config", "named_list"])
def test_chat_template_layouts_render_like_transformers(tmp_path, where):
  kw = {"jinja": dict(chat_template_file=RICH), "json": dict(chat_template_json=RICH),
        "tokenizer_config": dict(config_update={"chat_template": RICH}),
        "named_list": dict(config_update={"chat_template": [{"name": "default", "template": CHATML},
                                                            {"name": "tool_use", "template": RICH}]})}[where]
  path = write_layout(tmp_path, where, **kw)
  ours = models.load_tokenizer(path)
  ref = transformers.AutoTokenizer.from_pretrained(path)
  template = RICH if where == "json" else None  # transformers' tokenizer does not read chat_template.json
  for tools in (None, TOOLS):
    for gen in (True, False):
      expected = ref.apply_chat_template(MESSAGES, tools=tools, add_generation_prompt=gen, tokenize=False,
                                         chat_template=template)
      assert ours.apply_chat_template(MESSAGES, tools=tools, add_generation_prompt=gen) == expected
      assert ours.encode_chat(MESSAGES, tools=tools, add_generation_prompt=gen) == list(ref.apply_chat_template(
          MESSAGES, tools=tools, add_generation_prompt=gen, chat_template=template, return_dict=False))
  if where != "named_list":
    assert str(__import__("datetime").date.today().year) in ours.apply_chat_template(MESSAGES)


def test_jinja_file_wins_over_tokenizer_config(tmp_path):
  path = write_layout(tmp_path, "both", chat_template_file=CHATML, config_update={"chat_template": RICH})
  assert models.load_tokenizer(path).apply_chat_template(MESSAGES[:2]).startswith("<|im_start|>system")


def test_chat_template_errors_name_the_problem(tmp_path):
  path = write_layout(tmp_path, "rich", chat_template_file=RICH)
  tok = models.load_tokenizer(path)
  with pytest.raises(ChatTemplateError, match="no tool turns"):
    tok.apply_chat_template([{"role": "tool", "content": "x"}])
  with pytest.raises(ChatTemplateError, match="undefined"):
    tok.with_chat_template("{{ settings.mode }}").apply_chat_template(MESSAGES)
  with pytest.raises(ChatTemplateError, match="does not compile: line 1"):
    tok.with_chat_template("{% for m in messages %}")
  bare = models.load_tokenizer(write_layout(tmp_path, "bare"))
  with pytest.raises(ChatTemplateError, match="no chat template.*--chat_template"):
    bare.apply_chat_template(MESSAGES)
  assert tok.apply_chat_template(MESSAGES)  # nothing left broken


def test_checkpoint_without_tokenizer_and_bad_files(tmp_path):
  assert models.load_tokenizer(str(tmp_path)) is None
  path = write_layout(tmp_path, "broken")
  open(os.path.join(path, "tokenizer_config.json"), "w").write("{not json")
  with pytest.raises(models.CheckpointError, match="tokenizer_config.json: not valid JSON"):
    models.load_tokenizer(path)


def test_generation_config_eos_list_and_sampling_defaults(tmp_path):
  path = write_layout(tmp_path, "gen", generation_config={"eos_token_id": [2, 7], "temperature": 0.6, "top_p": 0.9,
                                                           "top_k": 20, "do_sample": True})
  assert set(models.load_tokenizer(path).eos_token_ids) >= {2, 7}
  gen = models.load_generation_config(path)
  assert gen.sampling_defaults() == {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
  greedy = write_layout(tmp_path, "greedy", generation_config={"do_sample": False, "temperature": 0.6})
  assert models.load_generation_config(greedy).sampling_defaults() == {"temperature": 0.0}
  assert models.load_generation_config(str(tmp_path)).sampling_defaults() == {}


def test_streaming_detokenization_never_splits_a_character():
  """Token-by-token decoding of byte-level pieces: every streamed prefix is whole characters, and
  the pieces add up to the final text."""
  tok = models.load_tokenizer(DEFAULT_MODEL_DIR)
  text = "caf\u00e9 \u4e2d\u6587 \U0001F600 done"
  ids = tok.encode(text, add_special_tokens=False)
  assert len(ids) > len(text.split())  # multi-byte characters span several tokens
  sent = ""
  for n in range(1, len(ids) + 1):
    safe = stream_safe_prefix(tok.decode(ids[:n]), [])
    assert safe.startswith(sent) and "\ufffd" not in safe
    sent = safe
  assert sent == text
