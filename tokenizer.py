"""The tokenizer of a Hugging Face checkpoint dir, as transformers' AutoTokenizer tokenizes: SentencePiece
tokenizer.model, or tokenizer.json through the optional `tokenizers` package; special ids, whether bos
is prepended, and dummy prefixes handled the way transformers 5 does (sources: tokenization_utils_tokenizers.py,
tokenization_llama.py, models/gemma/tokenization_gemma.py). Runtime: sentencepiece; tokenizers when a
checkpoint ships only tokenizer.json."""
import json
from pathlib import Path


class Tokenizer:
    """SentencePiece tokenizer.model, or tokenizer.json through the optional `tokenizers` package.

    Special ids: the tokenizer model's, overridden by config.json, generation_config.json, then
    tokenizer_config.json (most specific last; there an explicit null removes the token, as Qwen2.5's
    "bos_token": null does although its config.json names one); a list of eos ids keeps the first; pad falls
    back to eos. `add_bos`: whether transformers' AutoTokenizer prepends bos to a text: with a tokenizer.json,
    what its post_processor puts first (transformers 5 then drops add_bos_token, tokenization_utils_base.py
    _from_pretrained), else add_bos_token in tokenizer_config.json (default false); never without a bos token.
    Dummy prefix (SentencePiece add_dummy_prefix: Llama 2, Mistral v0.1; in tokenizer.json a Metaspace
    prepend_scheme, a ByteLevel add_prefix_space or a Prepend normalizer): transformers puts one '▁' at the start
    of the whole text. encode(piece, start=False) tokenizes a piece that continues a text, without it, so a
    prompt tokenized piece by piece gets the ids of the whole string (same tokenizer where there is no prefix)."""

    def __init__(self, path):
        path = Path(path)
        self.sp = self.tk = None
        spec = json.loads((path / "tokenizer.json").read_text()) if (path / "tokenizer.json").exists() else None
        if (path / "tokenizer.model").exists():
            import sentencepiece
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            # The same model with normalizer_spec.add_dummy_prefix = false: a parser merges a repeated message
            # field, so ModelProto field 3 (normalizer_spec) holding field 3 = 0 overrides that flag alone.
            proto = self.sp.serialized_model_proto() + b"\x1a\x02\x18\x00"
            self._sp_rest = sentencepiece.SentencePieceProcessor(model_proto=proto)
            ids = {name: getattr(self.sp, f"{name}_id")() for name in ("bos", "eos", "pad")}
            ids = {k: (v if v >= 0 else None) for k, v in ids.items()}
        elif spec is not None:
            try:
                import tokenizers
            except ImportError as e:
                raise ImportError(f"{path / 'tokenizer.json'} needs the tokenizers package: "
                                  "pip install tokenizers") from e
            self.tk = tokenizers.Tokenizer.from_str(json.dumps(spec))
            rest = {**spec, "normalizer": _no_prefix(spec.get("normalizer")),
                    "pre_tokenizer": _no_prefix(spec.get("pre_tokenizer"))}
            self._tk_rest = self.tk if rest == spec else tokenizers.Tokenizer.from_str(json.dumps(rest))
            ids = {"bos": None, "eos": None, "pad": None}
        else:
            raise FileNotFoundError(f"{path}: no tokenizer.model or tokenizer.json")
        files = ("config.json", "generation_config.json", "tokenizer_config.json")
        configs = {f: json.loads((path / f).read_text()) if (path / f).exists() else {} for f in files}
        for file, cfg in configs.items():
            for name in ids:
                token = cfg.get(f"{name}_token")  # a string, or {"content": string} in older files
                token = token.get("content") if isinstance(token, dict) else token
                value = self._token_id(token) if isinstance(token, str) else cfg.get(f"{name}_token_id")
                value = value[0] if isinstance(value, list) and value else value
                if isinstance(value, int):
                    ids[name] = value
                elif file == "tokenizer_config.json" and f"{name}_token" in cfg and token is None:
                    ids[name] = None
        self.bos_id, self.eos_id = ids["bos"], ids["eos"]
        self.pad_id = ids["pad"] if ids["pad"] is not None else ids["eos"]
        add_bos_token = configs["tokenizer_config.json"].get("add_bos_token")
        prefix = _template_prefix(spec.get("post_processor")) if spec else [self.bos_id] * bool(add_bos_token)
        if prefix not in ([], [self.bos_id]):
            raise ValueError(f"{path / 'tokenizer.json'}: the post_processor puts ids {prefix} before the text, "
                             f"not the bos token ({self.bos_id}); not supported")
        self.add_bos = self.bos_id is not None and bool(prefix)

    def _token_id(self, token: str) -> int | None:
        if self.sp is not None:
            i = self.sp.piece_to_id(token)
            return i if self.sp.id_to_piece(i) == token else None
        return self.tk.token_to_id(token)

    def encode(self, text: str, bos: bool = False, start: bool = True) -> list[int]:
        """Token ids of text (no special tokens unless bos). start=False: text continues a string, so it gets
        no dummy prefix (see the class docstring). Nor does a text that starts with a space: transformers'
        Metaspace and ByteLevel add '▁' only where there is none (SentencePiece itself would add a second)."""
        start = start and not text.startswith(" ")
        if self.sp is not None:
            ids = (self.sp if start else self._sp_rest).encode(text)
        else:
            ids = (self.tk if start else self._tk_rest).encode(text, add_special_tokens=False).ids
        if bos and self.bos_id is None:
            raise ValueError("this tokenizer has no bos token")
        return [self.bos_id] + ids if bos else ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        return self.sp.decode(ids) if self.sp is not None else self.tk.decode(ids, skip_special_tokens=True)


def _no_prefix(node):
    """A tokenizer.json normalizer or pre_tokenizer with its dummy prefix off: Prepend normalizers dropped,
    Metaspace prepend_scheme "never", add_prefix_space false (Metaspace of older files, ByteLevel)."""
    if isinstance(node, list):
        return [n for n in map(_no_prefix, node) if n is not None]
    if not isinstance(node, dict):
        return node
    if node.get("type") == "Prepend":
        return None
    out = {k: _no_prefix(v) for k, v in node.items()}
    if out.get("type") in ("Metaspace", "ByteLevel"):
        out.update({k: v for k, v in (("prepend_scheme", "never"), ("add_prefix_space", False)) if k in out})
    return out


def _template_prefix(post) -> list[int]:
    """Ids a tokenizer.json post_processor puts before a single text (TemplateProcessing, alone or in a Sequence)."""
    if not post:
        return []
    if post.get("type") == "Sequence":
        return [i for p in post["processors"] for i in _template_prefix(p)]
    if post.get("type") != "TemplateProcessing":
        return []
    ids = []
    for piece in post["single"]:
        if "Sequence" in piece:
            break
        ids += post["special_tokens"][piece["SpecialToken"]["id"]]["ids"]
    return ids
