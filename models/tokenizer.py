"""A checkpoint's tokenizer, chat template and generation defaults, read as transformers reads them.

`load_tokenizer(path)` gives what `transformers.AutoTokenizer.from_pretrained(path)` gives for
tokenization, on `tokenizers` and `jinja2` alone:

- encoding applies tokenizer.json's post-processor (Llama 3 adds BOS there, with no
  `add_bos_token` in tokenizer_config.json). When tokenizer.json has no post-processor, one is
  built from tokenizer_config.json's `add_bos_token` / `add_eos_token`, as transformers'
  `update_post_processor` does;
- the special tokens named in tokenizer_config.json (`bos_token`, `eos_token`, `unk_token`,
  `pad_token`, ..., `additional_special_tokens` / `extra_special_tokens`) and its
  `added_tokens_decoder` are added to the vocabulary when tokenizer.json lacks them;
- decoding skips special tokens on request and applies `clean_up_tokenization_spaces` except
  to BPE models (transformers skips it there too);
- the chat template comes from chat_template.jinja, else chat_template.json, else
  tokenizer_config.json's `chat_template` (a string or a list of named templates), and is
  rendered in transformers' sandboxed environment: `trim_blocks`, `lstrip_blocks`, loop
  controls, its `tojson`, `raise_exception`, `strftime_now`, `dict` and `namespace`, with the
  special tokens (`bos_token`, `eos_token`, ...) as variables; a chat is then encoded without
  special tokens (the template writes them).

transformers itself is not used at run time: its tokenizer loader imports torch whenever torch
is installed and takes seconds to import; tests compare this module with it on every layout.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
from typing import Any, Iterable, Mapping, Sequence

from models.loading import CheckpointError, read_json

SPECIAL_TOKEN_FIELDS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class ChatTemplateError(ValueError):
  """A chat template is missing, does not compile, or fails on the given messages."""


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """What generation_config.json asks for (transformers' names); None = not set there.

  eos_token_ids: every token that ends a turn (generation_config's `eos_token_id`, a list or one).
  """
  eos_token_ids: tuple[int, ...] = ()
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  do_sample: bool | None = None
  max_new_tokens: int | None = None

  def sampling_defaults(self) -> dict[str, Any]:
    """SamplingParams fields to use where a request leaves them unset (vLLM's `--generation-config
    auto`): temperature / top_p / top_k when sampling is on (`do_sample` true or unset), greedy
    when `do_sample` is false, and max_new_tokens as max_tokens."""
    out: dict[str, Any] = {}
    if self.do_sample is False:
      out["temperature"] = 0.0
    else:
      for name in ("temperature", "top_p", "top_k"):
        value = getattr(self, name)
        if value is not None:
          out[name] = value
    if self.max_new_tokens is not None:
      out["max_tokens"] = self.max_new_tokens
    return out


def load_generation_config(path: str | os.PathLike) -> GenerationConfig:
  """generation_config.json of a checkpoint directory (all fields None when there is none)."""
  file = os.path.join(os.fspath(path), "generation_config.json")
  if not os.path.exists(file):
    return GenerationConfig()
  data = read_json(file)
  eos = data.get("eos_token_id")
  eos_ids = () if eos is None else tuple(int(e) for e in eos) if isinstance(eos, list) else (int(eos),)

  def number(name, kind):
    value = data.get(name)
    if value is None:
      return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise CheckpointError(f"{file}: {name}={value!r} must be a number")
    return kind(value)

  do_sample = data.get("do_sample")
  top_k = number("top_k", int)
  return GenerationConfig(eos_token_ids=eos_ids, temperature=number("temperature", float), top_p=number("top_p", float),
                          top_k=None if top_k is None else max(top_k, 0), max_new_tokens=number("max_new_tokens", int),
                          do_sample=None if do_sample is None else bool(do_sample))


class Tokenizer:
  """A `tokenizers.Tokenizer` with the special tokens, chat template and EOS ids of its checkpoint.

  eos_token_ids: the ids that end generation: config.json's and generation_config.json's
    `eos_token_id` plus the tokenizer's `eos_token`.
  chat_template: a template string, a {name: template} dict (transformers' named templates;
    "default" is used, "tool_use" when tools are given), or None.
  """

  def __init__(self, tokenizer, *, eos_token_ids: Sequence[int] = (), bos_token_id: int | None = None,
               chat_template: str | Mapping[str, str] | None = None, special_tokens: Mapping[str, str] | None = None,
               clean_up_tokenization_spaces: bool = False, source: str = "tokenizer"):
    self._tok = tokenizer
    self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
    self.eos_token_ids = tuple(dict.fromkeys(int(e) for e in eos_token_ids))
    self.bos_token_id = bos_token_id if bos_token_id is not None else self.token_to_id(self.bos_token or "")
    self.chat_template = chat_template
    self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
    self.source = source
    self._compiled: dict[str, Any] = {}

  @property
  def bos_token(self) -> str | None:
    return self.special_tokens.get("bos_token")

  @property
  def eos_token(self) -> str | None:
    return self.special_tokens.get("eos_token")

  @property
  def vocab_size(self) -> int:
    return self._tok.get_vocab_size()

  @property
  def backend(self):
    """The underlying `tokenizers.Tokenizer`."""
    return self._tok

  def token_to_id(self, token: str) -> int | None:
    return self._tok.token_to_id(token)

  def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`; special tokens written in the text are recognised as such."""
    return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
    if self.clean_up_tokenization_spaces and type(self._tok.model).__name__ != "BPE":
      for old, new in _CLEANUP:
        text = text.replace(old, new)
    return text

  # -- chat ------------------------------------------------------------------------------------
  @property
  def has_chat_template(self) -> bool:
    return bool(self.chat_template)

  def with_chat_template(self, chat_template: str) -> "Tokenizer":
    """A copy of this tokenizer that renders chats with `chat_template` (checked now)."""
    other = copy.copy(self)
    other.chat_template = chat_template
    other._compiled = {}
    other._template_source(None)
    return other

  def _template_source(self, tools) -> str:
    template = self.chat_template
    if not template:
      raise ChatTemplateError(
          f"{self.source} has no chat template (looked for chat_template.jinja, chat_template.json and "
          f"tokenizer_config.json's chat_template); pass one with --chat_template=FILE (or "
          f"Tokenizer.with_chat_template), or send a plain prompt to /v1/completions")
    if isinstance(template, Mapping):
      name = "tool_use" if tools is not None and "tool_use" in template else "default"
      if name not in template:
        raise ChatTemplateError(f"{self.source} has named chat templates {sorted(template)} but none called "
                                f"'default'; pass one with --chat_template=FILE")
      template = template[name]
    if template not in self._compiled:
      self._compiled[template] = _compile(template, self.source)
    return template

  def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], *, tools: Sequence[Mapping] | None = None,
                          documents: Sequence[Mapping] | None = None, add_generation_prompt: bool = True,
                          **template_kwargs: Any) -> str:
    """The prompt text of a conversation (transformers' `apply_chat_template(tokenize=False)`).

    messages: dicts with at least `role`; keys whose value is None are dropped, as transformers does.
    Raises ChatTemplateError when there is no template or the template fails (its
    `raise_exception`, an undefined variable used as an object, a type error)."""
    import jinja2
    if not messages:
      raise ChatTemplateError("messages is empty")
    template = self._template_source(tools)
    chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]
    variables = {**self.special_tokens, **template_kwargs}
    try:
      return self._compiled[template].render(messages=chat, tools=None if tools is None else list(tools),
                                             documents=None if documents is None else list(documents),
                                             add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
      raise ChatTemplateError(f"the chat template of {self.source} failed: {type(e).__name__}: {e}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise ChatTemplateError(f"the chat template of {self.source} failed on these messages: "
                              f"{type(e).__name__}: {e}") from None

  def encode_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> list[int]:
    """Token ids of a rendered conversation; the template writes every special token itself."""
    return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


def _compile(template: str, source: str):
  """transformers' chat-template environment (utils/chat_template_utils.py)."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  class Generation(jinja2.ext.Extension):
    # transformers' `{% generation %}` block marks assistant tokens for training masks; rendering
    # only needs its body.
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  class Namespace(jinja2.utils.Namespace):
    def __init__(*args, **kwargs):
      self, args = args[0], args[1:]
      attrs = dict(*args, **kwargs)
      for name in attrs:
        Namespace._check(name)
      jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
      Namespace._check(name)
      jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
      if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attribute {name!r}")

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[Generation, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals.update(raise_exception=raise_exception, namespace=Namespace, dict=dict,
                     strftime_now=lambda fmt: datetime.datetime.now().strftime(fmt))
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f"the chat template of {source} does not compile: line {e.lineno}: {e.message}") from None


# -- loading ---------------------------------------------------------------------------------------

def _token_content(value: Any) -> str | None:
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


def read_chat_template(path: str | os.PathLike, tokenizer_config: Mapping[str, Any] | None = None):
  """A checkpoint's chat template: chat_template.jinja (+ additional_chat_templates/*.jinja as
  named ones), else chat_template.json's `chat_template`, else tokenizer_config.json's; None."""
  path = os.fspath(path)
  templates: dict[str, str] = {}
  jinja_file = os.path.join(path, "chat_template.jinja")
  if os.path.exists(jinja_file):
    with open(jinja_file, encoding="utf-8") as f:
      templates["default"] = f.read()
  extra_dir = os.path.join(path, "additional_chat_templates")
  if os.path.isdir(extra_dir):
    for name in sorted(os.listdir(extra_dir)):
      if name.endswith(".jinja"):
        with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
          templates[name[:-len(".jinja")]] = f.read()
  if templates:
    return templates["default"] if list(templates) == ["default"] else templates
  json_file = os.path.join(path, "chat_template.json")
  if os.path.exists(json_file):
    data = read_json(json_file)
    template = data.get("chat_template") if isinstance(data, dict) else None
    if not isinstance(template, (str, list)):
      raise CheckpointError(f"{json_file}: expected an object with a 'chat_template' string")
    return _named_templates(template, json_file)
  template = (tokenizer_config or {}).get("chat_template")
  return None if template is None else _named_templates(template, os.path.join(path, "tokenizer_config.json"))


def read_chat_template_arg(value: str) -> str:
  """A `--chat_template` value: a .jinja file, a chat_template.json / tokenizer_config.json
  (its `chat_template` field), or the template text itself."""
  if os.path.isfile(value):
    if value.endswith(".json"):
      data = read_json(value)
      template = data.get("chat_template") if isinstance(data, dict) else None
      if not isinstance(template, str):
        raise ChatTemplateError(f"{value}: has no 'chat_template' string")
      return template
    with open(value, encoding="utf-8") as f:
      return f.read()
  if "{{" in value or "{%" in value:
    return value
  raise ChatTemplateError(f"chat template {value!r} is neither a file nor a template (no '{{{{' or '{{%')")


def _named_templates(template: Any, where: str):
  if isinstance(template, str):
    return template
  if isinstance(template, list) and all(isinstance(t, dict) and "name" in t and "template" in t for t in template):
    return {t["name"]: t["template"] for t in template}
  raise CheckpointError(f"{where}: chat_template must be a string or a list of {{name, template}} objects")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | None:
  """The tokenizer of a checkpoint directory, or None when it has no tokenizer.json."""
  from tokenizers import AddedToken, Tokenizer as HFTokenizer, processors
  path = os.fspath(path)
  tok_file = os.path.join(path, "tokenizer.json")
  if not os.path.exists(tok_file):
    return None
  try:
    tok = HFTokenizer.from_file(tok_file)
  except Exception as e:  # tokenizers raises its own exception type
    raise CheckpointError(f"{tok_file}: cannot load tokenizer ({e})") from None
  tcfg_file = os.path.join(path, "tokenizer_config.json")
  tcfg = read_json(tcfg_file) if os.path.exists(tcfg_file) else {}
  if not isinstance(tcfg, dict):
    raise CheckpointError(f"{tcfg_file}: expected a JSON object")
  special = {k: _token_content(tcfg.get(k)) for k in SPECIAL_TOKEN_FIELDS}
  special = {k: v for k, v in special.items() if v is not None}

  # Tokens tokenizer_config.json declares that tokenizer.json lacks (transformers adds them).
  added = sorted(((int(i), t) for i, t in (tcfg.get("added_tokens_decoder") or {}).items()), key=lambda x: x[0])
  to_add = [AddedToken(t["content"], special=bool(t.get("special", False)), normalized=bool(t.get("normalized", False)),
                       lstrip=bool(t.get("lstrip", False)), rstrip=bool(t.get("rstrip", False)),
                       single_word=bool(t.get("single_word", False)))
            for _, t in added if isinstance(t, dict) and tok.token_to_id(t.get("content", "")) is None]
  extra = tcfg.get("extra_special_tokens") or tcfg.get("additional_special_tokens") or []
  extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
  for content in list(special.values()) + [_token_content(t) for t in extra]:
    if content is not None and tok.token_to_id(content) is None and content not in [t.content for t in to_add]:
      to_add.append(AddedToken(content, special=True, normalized=False))
  if to_add:
    tok.add_tokens(to_add)

  if tok.post_processor is None:
    add_bos = bool(tcfg.get("add_bos_token", False)) and "bos_token" in special
    add_eos = bool(tcfg.get("add_eos_token", False)) and "eos_token" in special
    bos, eos = special.get("bos_token"), special.get("eos_token")
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on])

  from models.loading import read_config
  cfg = read_config(path) if os.path.exists(os.path.join(path, "config.json")) else {}
  eos_ids: list[int] = []
  eos = cfg.get("eos_token_id")
  eos_ids += [] if eos is None else list(eos) if isinstance(eos, list) else [int(eos)]
  eos_ids += list(load_generation_config(path).eos_token_ids)
  if special.get("eos_token") is not None:
    eos_ids.append(tok.token_to_id(special["eos_token"]))
  bos_id = tok.token_to_id(special["bos_token"]) if "bos_token" in special else cfg.get("bos_token_id")
  return Tokenizer(tok, eos_token_ids=eos_ids, bos_token_id=bos_id, chat_template=read_chat_template(path, tcfg),
                   special_tokens=special, source=path,
                   clean_up_tokenization_spaces=bool(tcfg.get("clean_up_tokenization_spaces", False)))
