"""Mutations of a tiny checkpoint (and of a finished output) for the fuzz test, ``tests/test_fuzz.py``.

A ``Mutation`` has a readable id ("header[layers.1.self_attn.q_proj.weight]:offsets->negative") and an
``apply(folder)`` that damages a *copy* of a checkpoint folder in place and returns a one-line detail of
what it did (the positions a random byte flip chose, the JSON path a random edit replaced, ...).
Everything is deterministic: the case list comes from fixed seeds, and each random mutation draws from
``random.Random(seed)`` with the seed written in its id.

Targets: the index (model.safetensors.index.json), the safetensors headers and data of the shards,
config.json, extra / missing checkpoint tensors, and, for ``verify``, the run's manifest and report.
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

INDEX = "model.safetensors.index.json"
MANIFEST = ".lowmem/manifest.json"
REPORT = "prune_report.json"
LAYERS = 3  # tests.tiny.make_tiny_llama's default
BLOCK = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
         "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight",
         "post_attention_layernorm.weight"]
TENSORS = (["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
           + [f"model.layers.{i}.{s}" for i in range(LAYERS) for s in BLOCK])
MATRICES = [t for t in TENSORS if "layers." in t and "norm" not in t]

# values a random JSON edit puts somewhere
JUNK = [None, True, False, -1, 0, 1, 1.5, -0.0, 2**64, -(2**63), 1e308, float("nan"), float("inf"), "", "x", "..",
        "../x", "/", "/etc/passwd", "a\u0000b", "\u00e9\u00e8", [], {}, [1, "a"], {"a": 1}, [[[]]], "F33", [-1, 2]]


@dataclass(frozen=True)
class Mutation:
    id: str
    fn: Callable[[Path, random.Random], str | None] = field(compare=False, repr=False)
    seed: int = 0
    expect: int | None = None  # prune / eval / plan must exit with exactly this code (None: 0 or 2 will do)

    def apply(self, folder: Path) -> str:
        return self.fn(folder, random.Random(self.seed)) or ""


# -- small file helpers ---------------------------------------------------------------------------------

def load(path: Path):
    return json.loads(path.read_text())


def dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2))


def weight_map(folder: Path) -> dict[str, str]:
    return load(folder / INDEX)["weight_map"]


def shard_of(folder: Path, tensor: str) -> Path:
    return folder / weight_map(folder)[tensor]


def short(tensor: str) -> str:
    return tensor.removeprefix("model.")


def flip_bytes(path: Path, rng: random.Random, k: int, lo: int = 0, hi: int | None = None) -> str:
    data = bytearray(path.read_bytes())
    hi = len(data) if hi is None else min(hi, len(data))
    spots = sorted(rng.sample(range(lo, hi), min(k, hi - lo)))
    for p in spots:
        data[p] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"{path.name}: flipped bytes at {spots}"


def truncate(path: Path, rng: random.Random) -> str:
    size = path.stat().st_size
    keep = rng.randrange(0, size)
    path.write_bytes(path.read_bytes()[:keep])
    return f"{path.name}: kept {keep} of {size} bytes"


def json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_paths(v, prefix + (i,))


def random_json_edit(obj, rng: random.Random):
    """(new document, description): one value somewhere replaced by junk, or one key/item deleted or added."""
    paths = list(json_paths(obj))
    path = rng.choice(paths[1:] if len(paths) > 1 else paths)
    value = rng.choice(JUNK)
    op = rng.choices(["replace", "delete", "add"], weights=[7, 2, 1])[0]
    if not path:
        return value, f"whole document -> {value!r}"
    parent = obj
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    where = "".join(f"[{k!r}]" for k in path)
    if op == "delete":
        del parent[key]
        return obj, f"deleted {where}"
    if op == "add" and isinstance(parent, dict):
        parent[f"junk{rng.randrange(100)}"] = value
        return obj, f"added a junk key beside {where}: {value!r}"
    old = parent[key]
    parent[key] = value
    return obj, f"{where}: {str(old)[:60]!r} -> {value!r}"


def json_file_random_edit(rel: str):
    def fn(folder: Path, rng: random.Random) -> str:
        path = folder / rel
        obj, what = random_json_edit(load(path), rng)
        dump(path, obj)
        return f"{rel}: {what}"
    return fn


def replace_file_with_dir(rel: str):
    def fn(folder: Path, rng: random.Random) -> None:
        (folder / rel).unlink()
        (folder / rel).mkdir()
        (folder / rel / "x").write_text("x")
    return fn


def symlink(rel: str, target: str):
    """Replace the file with a symbolic link to ``target`` ({name}: the file's own name)."""
    def fn(folder: Path, rng: random.Random) -> None:
        path = folder / rel
        path.unlink()
        path.symlink_to(target.format(name=path.name))
    return fn


def delete_file(rel: str):
    def fn(folder: Path, rng: random.Random) -> None:
        (folder / rel).unlink()
    return fn


def write_bytes(rel: str, make: Callable[[bytes], bytes]):
    def fn(folder: Path, rng: random.Random) -> None:
        path = folder / rel
        path.write_bytes(make(path.read_bytes()))
    return fn


def edit_json(rel: str, edit: Callable):
    """``edit(obj)`` changes the document in place or returns a new one (None: changed in place)."""
    def fn(folder: Path, rng: random.Random) -> None:
        path = folder / rel
        obj = load(path)
        new = edit(obj)
        dump(path, obj if new is None else new)
    return fn


def deep(n: int = 100_000) -> str:
    return "[" * n + "]" * n


# -- generic damage to any JSON file -----------------------------------------------------------------

def json_file_kinds(rel: str) -> dict[str, Callable]:
    return {
        "not-utf8": write_bytes(rel, lambda b: b"\xff\xfe" + b),
        "latin1-byte": write_bytes(rel, lambda b: b.replace(b'"', b'"\xe9', 1)),
        "invalid-json-cut": write_bytes(rel, lambda b: b[: len(b) // 2]),
        "empty-file": write_bytes(rel, lambda b: b""),
        "json-list": edit_json(rel, lambda o: [o]),
        "json-string": edit_json(rel, lambda o: "model"),
        "json-null": write_bytes(rel, lambda b: b"null"),
        "json-number": edit_json(rel, lambda o: 3),
        "deep-nesting": write_bytes(rel, lambda b: deep().encode()),
        "is-a-directory": replace_file_with_dir(rel),
        "dangling-symlink": symlink(rel, "no-such-file.json"),
        "symlink-loop": symlink(rel, "{name}"),
        "deleted": delete_file(rel),
    }


# -- the index ------------------------------------------------------------------------------------------

def _set_shard(tensor: str, value):
    def edit(o):
        o["weight_map"][tensor] = value(o) if callable(value) else value
    return edit_json(INDEX, edit)


def _other_shard(tensor: str):
    def fn(folder: Path, rng: random.Random) -> str:
        wm = weight_map(folder)
        others = sorted(set(wm.values()) - {wm[tensor]})
        wm[tensor] = rng.choice(others)
        idx = load(folder / INDEX)
        idx["weight_map"] = wm
        dump(folder / INDEX, idx)
        return f"{tensor} -> {wm[tensor]}"
    return fn


def _outside_copy(tensor: str, rel_name: str):
    """Copy the tensor's shard next to the model folder and point the index at it with ``rel_name``."""
    def fn(folder: Path, rng: random.Random) -> None:
        src = shard_of(folder, tensor)
        (folder.parent / "elsewhere.safetensors").write_bytes(src.read_bytes())
        _set_shard(tensor, rel_name.format(parent=folder.parent, model=folder.name, shard=src.name))(folder, rng)
    return fn


def _with_shard_name(tensor: str, template: str):
    def fn(folder: Path, rng: random.Random) -> None:
        shard = weight_map(folder)[tensor]
        _set_shard(tensor, template.format(shard=shard, model=folder.name, abs=(folder / shard).resolve()))(folder, rng)
    return fn


def _subdir_target(tensor: str):
    def fn(folder: Path, rng: random.Random) -> None:
        (folder / "subdir").mkdir()
        _set_shard(tensor, "subdir")(folder, rng)
    return fn


def _drop_shard_entries(tensor: str):
    def edit(o):
        shard = o["weight_map"][tensor]
        o["weight_map"] = {k: v for k, v in o["weight_map"].items() if v != shard}
    return edit_json(INDEX, edit)


def _swap(a: str, b: str):
    def edit(o):
        wm = o["weight_map"]
        wm[a], wm[b] = wm[b], wm[a]
    return edit_json(INDEX, edit)


def _duplicate_key(tensor: str):
    """The tensor's key twice; JSON parsers keep the last one, which names a missing shard."""
    def fn(folder: Path, rng: random.Random) -> None:
        text = (folder / INDEX).read_text()
        key, shard = json.dumps(tensor), json.dumps(weight_map(folder)[tensor])
        text = text.replace(f"{key}: {shard}", f'{key}: {shard}, {key}: "model-00099-of-00099.safetensors"', 1)
        (folder / INDEX).write_text(text)
    return fn


def _put(obj: dict, key: str, value) -> None:
    obj[key] = value


def index_kinds(rng: random.Random) -> dict[str, Callable]:
    t = lambda: rng.choice(TENSORS)  # noqa: E731
    kinds = {f"index:{k}": v for k, v in json_file_kinds(INDEX).items()}
    kinds |= {
        "index:weight_map->list": edit_json(INDEX, lambda o: _put(o, "weight_map", list(o["weight_map"].items()))),
        "index:weight_map->string": edit_json(INDEX, lambda o: _put(o, "weight_map", "model.safetensors")),
        "index:weight_map->missing": edit_json(INDEX, lambda o: o.pop("weight_map")),
        "index:weight_map->null": edit_json(INDEX, lambda o: _put(o, "weight_map", None)),
        "index:weight_map->empty": edit_json(INDEX, lambda o: _put(o, "weight_map", {})),
        "index:weight_map->int": edit_json(INDEX, lambda o: _put(o, "weight_map", 7)),
        "index:metadata->list": edit_json(INDEX, lambda o: o.__setitem__("metadata", [1])),
        "index:metadata->missing": edit_json(INDEX, lambda o: o.pop("metadata")),
        "index:total_size->string": edit_json(INDEX, lambda o: o["metadata"].__setitem__("total_size", "big")),
        "index:total_size->negative": edit_json(INDEX, lambda o: o["metadata"].__setitem__("total_size", -5)),
        "index:metadata-deep-nesting": write_bytes(INDEX, lambda b: b.replace(b'"metadata": {', b'"metadata": {"x": '
                                                                           + deep().encode() + b",", 1)),
    }
    for name, value in [("int", 42), ("null", None), ("list", ["model-00001-of-00012.safetensors"]),
                        ("dict", {"a": 1}), ("float", 1.5), ("bool", True), ("empty-string", ""), ("dot", "."),
                        ("dotdot", ".."), ("slash", "/"), ("root-file", "/etc/hostname"), ("tilde", "~/x.safetensors"),
                        ("missing-file", "model-00099-of-00012.safetensors"), ("config.json", "config.json"),
                        ("tokenizer.json", "tokenizer.json"), ("the-index", INDEX),
                        ("NUL-byte", "model\u0000.safetensors"), ("very-long-name", "a" * 300 + ".safetensors"),
                        ("deep-path", "/".join(["d"] * 2000) + "/x.safetensors"), ("backslash", "..\\x.safetensors")]:
        tensor = t()
        kinds[f"index:shard[{short(tensor)}]->{name}"] = _set_shard(tensor, value)
    for name, template in [("absolute-inside", "{abs}"), ("dotslash", "./{shard}"), ("sub-dotdot", "sub/../{shard}"),
                           ("out-and-back", "../{model}/{shard}"), ("double-slash", ".//{shard}")]:
        tensor = t()
        kinds[f"index:shard[{short(tensor)}]->{name}"] = _with_shard_name(tensor, template)
    for name, template in [("dotdot-outside", "../elsewhere.safetensors"),
                           ("absolute-outside", "{parent}/elsewhere.safetensors")]:
        tensor = t()
        kinds[f"index:shard[{short(tensor)}]->{name}"] = _outside_copy(tensor, template)
    tensor = t()
    kinds[f"index:shard[{short(tensor)}]->a-directory"] = _subdir_target(tensor)
    tensor = t()
    kinds[f"index:shard[{short(tensor)}]->wrong-shard"] = _other_shard(tensor)
    tensor = t()
    kinds[f"index:drop-entry[{short(tensor)}]"] = edit_json(INDEX, lambda o, n=tensor: o["weight_map"].pop(n))
    tensor = t()
    kinds[f"index:drop-all-entries-of-shard[{short(tensor)}]"] = _drop_shard_entries(tensor)
    a, b = rng.sample(TENSORS, 2)
    kinds[f"index:swap[{short(a)},{short(b)}]"] = _swap(a, b)
    tensor = t()
    kinds[f"index:duplicate-key[{short(tensor)}]"] = _duplicate_key(tensor)
    kinds["index:extra-entry"] = edit_json(INDEX, lambda o: o["weight_map"].__setitem__(
        "model.layers.0.self_attn.extra.weight", "model-00001-of-00012.safetensors"))
    kinds["index:extra-entry-empty-name"] = edit_json(INDEX, lambda o: o["weight_map"].__setitem__(
        "", next(iter(o["weight_map"].values()))))
    return kinds


# -- safetensors headers and data -----------------------------------------------------------------------

class Shard:
    """A shard split into header JSON and data; ``save`` writes it back (N = the new header's length unless
    ``n`` is set, the header's JSON unless ``raw`` is set)."""

    def __init__(self, path: Path):
        self.path = path
        blob = path.read_bytes()
        (n,) = struct.unpack("<Q", blob[:8])
        self.orig_n = n
        self.header_bytes = blob[8:8 + n]
        self.header = json.loads(self.header_bytes)
        self.data = bytearray(blob[8 + n:])
        self.raw: bytes | None = None
        self.n: int | None = None

    def tensors(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def span(self, name: str) -> tuple[int, int]:
        b, e = self.header[name]["data_offsets"]
        return b, e

    def save(self) -> None:
        body = self.raw if self.raw is not None else json.dumps(self.header).encode()
        n = len(body) if self.n is None else self.n
        self.path.write_bytes(struct.pack("<Q", n) + body + bytes(self.data))


def header_kind(tensor: str, edit: Callable[[Shard, str, random.Random], str | None]):
    def fn(folder: Path, rng: random.Random) -> str | None:
        shard = Shard(shard_of(folder, tensor))
        what = edit(shard, tensor, rng)
        shard.save()
        return what
    return fn


def _entry(key: str, value):
    def edit(s: Shard, t: str, rng) -> None:
        s.header[t][key] = value(s, t) if callable(value) else value
    return edit


def _offsets(f: Callable[[int, int, Shard], object]):
    def edit(s: Shard, t: str, rng) -> None:
        b, e = s.span(t)
        s.header[t]["data_offsets"] = f(b, e, s)
    return edit


def _shape(f: Callable[[list], object]):
    def edit(s: Shard, t: str, rng) -> None:
        s.header[t]["shape"] = f(list(s.header[t]["shape"]))
    return edit


def _overlap(s: Shard, t: str, rng) -> str:
    size = s.span(t)[1] - s.span(t)[0]
    same = [u for u in s.tensors() if u != t and s.span(u)[1] - s.span(u)[0] == size]
    if same:
        s.header[t]["data_offsets"] = list(s.span(same[0]))
        return f"{t} now shares {same[0]}'s bytes"
    s.header[t]["data_offsets"] = [0, size]
    return f"{t} now starts at 0"


def _swap_equal(s: Shard, t: str, rng) -> str:
    size = s.span(t)[1] - s.span(t)[0]
    same = [u for u in s.tensors() if u != t and s.span(u)[1] - s.span(u)[0] == size]
    if not same:
        return "no tensor of equal size in this shard: nothing swapped"
    u = same[0]
    s.header[t]["data_offsets"], s.header[u]["data_offsets"] = list(s.span(u)), list(s.span(t))
    return f"swapped the offsets of {t} and {u}"


def _reverse_order(s: Shard, t: str, rng) -> None:
    """Store the tensors' bytes in reverse order (offsets updated: a valid, unusual layout)."""
    names = sorted(s.tensors(), key=lambda n: s.span(n)[0], reverse=True)
    data, pos = bytearray(), 0
    for n in names:
        b, e = s.span(n)
        data += s.data[b:e]
        s.header[n]["data_offsets"] = [pos, pos + e - b]
        pos += e - b
    s.data = data


def _gap(s: Shard, t: str, rng) -> None:
    b0, _ = s.span(t)
    s.data[b0:b0] = bytes(16)
    for n in s.tensors():
        b, e = s.span(n)
        if b >= b0:
            s.header[n]["data_offsets"] = [b + 16, e + 16]


def _dtype_same_width(s: Shard, t: str, rng) -> None:
    s.header[t]["dtype"] = "I32"


def _dtype_reinterpret(code: str, factor_num: int, factor_den: int):
    def edit(s: Shard, t: str, rng) -> None:
        shape = list(s.header[t]["shape"])
        shape[-1] = shape[-1] * factor_num // factor_den
        s.header[t]["dtype"], s.header[t]["shape"] = code, shape
    return edit


def _raw(f: Callable[[bytes, Shard, str], bytes]):
    def edit(s: Shard, t: str, rng) -> None:
        s.raw = f(s.header_bytes, s, t)
    return edit


def _n(f: Callable[[int, Shard], int]):
    def edit(s: Shard, t: str, rng) -> None:
        s.raw = s.header_bytes
        s.n = f(s.orig_n, s)
    return edit


def _header_obj(obj):
    def edit(s: Shard, t: str, rng) -> None:
        s.raw = json.dumps(obj(s.header) if callable(obj) else obj).encode()
    return edit


def _value(v: float):
    def edit(s: Shard, t: str, rng) -> None:
        b, _ = s.span(t)
        s.data[b + 4 * 3:b + 4 * 4] = struct.pack("<f", v)  # element 3 (F32 checkpoints)
    return edit


def _data_flip(k: int):
    def edit(s: Shard, t: str, rng) -> str:
        b, e = s.span(t)
        spots = sorted(rng.sample(range(b, e), k))
        for p in spots:
            s.data[p] ^= rng.randrange(1, 256)
        return f"{s.path.name}: flipped data bytes {spots} of {t}"
    return edit


def _dup_key(hb: bytes, s: Shard, t: str) -> bytes:
    """The tensor's key again at the end of the header (JSON parsers keep the last: a 1-element tensor)."""
    fake = json.dumps(t).encode() + b': {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'
    body = hb.rstrip()
    return body[:-1] + b", " + fake + b"}"


def file_kind(tensor: str, edit: Callable[[Path, random.Random], str | None]):
    def fn(folder: Path, rng: random.Random) -> str | None:
        return edit(shard_of(folder, tensor), rng)
    return fn


def _header_flip(path: Path, rng: random.Random) -> str:
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return flip_bytes(path, rng, rng.randint(1, 4), 8, 8 + n)


def _header_random_edit(path: Path, rng: random.Random) -> str:
    shard = Shard(path)
    shard.header, what = random_json_edit(shard.header, rng)
    shard.save()
    return f"{path.name} header: {what}"


def _shard_symlink(kind: str):
    def edit(path: Path, rng) -> None:
        if kind == "outside-copy":  # as a Hugging Face cache snapshot: a link into ../blobs
            blobs = path.parent.parent / "blobs"
            blobs.mkdir(exist_ok=True)
            (blobs / path.name).write_bytes(path.read_bytes())
            target = f"../blobs/{path.name}"
        else:
            target = {"dangling": "no-such.safetensors", "loop": path.name, "to-dir": "."}[kind]
        path.unlink()
        path.symlink_to(target)
    return edit


def _shard_to_dir(path: Path, rng) -> None:
    path.unlink()
    path.mkdir()


HEADER_EDITS: dict[str, Callable] = {
    "header->list": _header_obj([]),
    "header->list-of-header": _header_obj(lambda h: [h]),
    "header->string": _header_obj("header"),
    "header->null": _header_obj(None),
    "header->empty-object": _header_obj({}),
    "header->only-metadata": _header_obj({"__metadata__": {"format": "pt"}}),
    "offsets->strings": _offsets(lambda b, e, s: [str(b), str(e)]),
    "offsets->floats": _offsets(lambda b, e, s: [float(b), float(e)]),
    "offsets->negative": _offsets(lambda b, e, s: [b - e, 0]),
    "offsets->into-the-header": _offsets(lambda b, e, s: [b - 8 - len(s.header_bytes), e - 8 - len(s.header_bytes)]),
    "offsets->reversed": _offsets(lambda b, e, s: [e, b]),
    "offsets->past-end": _offsets(lambda b, e, s: [b + len(s.data), e + len(s.data)]),
    "offsets->huge": _offsets(lambda b, e, s: [2**63, 2**63 + e - b]),
    "offsets->beyond-u64": _offsets(lambda b, e, s: [2**64 + b, 2**64 + e]),
    "offsets->one-element": _offsets(lambda b, e, s: [b]),
    "offsets->three-elements": _offsets(lambda b, e, s: [b, e, e]),
    "offsets->null": _offsets(lambda b, e, s: None),
    "offsets->dict": _offsets(lambda b, e, s: {"begin": b, "end": e}),
    "offsets->bools": _offsets(lambda b, e, s: [False, True]),
    "offsets->nan": _offsets(lambda b, e, s: [float("nan"), float("nan")]),
    "offsets->overlap": _overlap,
    "offsets->swap-equal-size": _swap_equal,
    "offsets->reverse-data-order": _reverse_order,
    "offsets->gap": _gap,
    "shape->negative-both": _shape(lambda sh: [-d for d in sh] if len(sh) == 2 else [-1, -sh[0]]),
    "shape->negative-one": _shape(lambda sh: [-sh[0]] + sh[1:]),
    "shape->floats": _shape(lambda sh: [float(d) for d in sh]),
    "shape->strings": _shape(lambda sh: [str(d) for d in sh]),
    "shape->scalar": _shape(lambda sh: []),
    "shape->transposed": _shape(lambda sh: sh[::-1] if len(sh) == 2 else [1, sh[0]]),
    "shape->flattened": _shape(lambda sh: [sh[0] * (sh[1] if len(sh) > 1 else 1)]),
    "shape->huge": _shape(lambda sh: [2**31, 2**31]),
    "shape->huge-times-zero": _shape(lambda sh: [2**62, 0, 2**62]),
    "shape->null": _shape(lambda sh: None),
    "shape->string": _shape(lambda sh: "x".join(map(str, sh))),
    "shape->nested": _shape(lambda sh: [[d] for d in sh]),
    "shape->nan": _shape(lambda sh: [float("nan")] * len(sh)),
    "dtype->F33": _entry("dtype", "F33"),
    "dtype->int": _entry("dtype", 5),
    "dtype->list": _entry("dtype", ["F32"]),
    "dtype->null": _entry("dtype", None),
    "dtype->lowercase": _entry("dtype", "f32"),
    "dtype->F16-size-mismatch": _entry("dtype", "F16"),
    "dtype->I32-same-width": _dtype_same_width,
    "dtype->F16-reinterpreted": _dtype_reinterpret("F16", 2, 1),
    "dtype->BF16-reinterpreted": _dtype_reinterpret("BF16", 2, 1),
    "dtype->I64-reinterpreted": _dtype_reinterpret("I64", 1, 2),
    "dtype->F64-reinterpreted": _dtype_reinterpret("F64", 1, 2),
    "dtype->U8-reinterpreted": _dtype_reinterpret("U8", 4, 1),
    "dtype->F8_E4M3-reinterpreted": _dtype_reinterpret("F8_E4M3", 4, 1),
    "entry->int": lambda s, t, rng: s.header.__setitem__(t, 5),
    "entry->string": lambda s, t, rng: s.header.__setitem__(t, "F32"),
    "entry->list": lambda s, t, rng: s.header.__setitem__(t, list(s.header[t].values())),
    "entry->missing-dtype": lambda s, t, rng: s.header[t].pop("dtype"),
    "entry->missing-shape": lambda s, t, rng: s.header[t].pop("shape"),
    "entry->missing-offsets": lambda s, t, rng: s.header[t].pop("data_offsets"),
    "entry->extra-keys": _entry("junk", {"a": [1, 2]}),
    "entry->removed": lambda s, t, rng: s.header.pop(t),
    "entry->renamed": lambda s, t, rng: s.header.__setitem__(t + "x", s.header.pop(t)),
    "metadata->list": lambda s, t, rng: s.header.__setitem__("__metadata__", [1, 2]),
    "metadata->nested": lambda s, t, rng: s.header.__setitem__("__metadata__", {"a": {"b": [None, 1.5]}}),
    "metadata->deep-nesting": _raw(lambda hb, s, t: hb.replace(b"{", b'{"__x__": ' + deep().encode() + b", ", 1)),
    "N->plus-one": _n(lambda n, s: n + 1),
    "N->minus-one": _n(lambda n, s: n - 1),
    "N->zero": _n(lambda n, s: 0),
    "N->huge": _n(lambda n, s: 2**63),
    "N->whole-file": _n(lambda n, s: n + len(s.data)),
    "padded-with-spaces": _raw(lambda hb, s, t: hb + b" " * 64),
    "trailing-garbage": _raw(lambda hb, s, t: hb + b"xyz"),
    "utf8-bom": _raw(lambda hb, s, t: b"\xef\xbb\xbf" + hb),
    "not-utf8": _raw(lambda hb, s, t: hb.replace(b'"', b'"\xff', 1)),
    "duplicate-key": _raw(_dup_key),
    "data->nan": _value(float("nan")),
    "data->inf": _value(float("-inf")),
    "data->3e38": _value(3e38),
    "data->denormal": _value(1e-40),
}

FILE_EDITS: dict[str, Callable] = {
    "file->empty": lambda p, rng: p.write_bytes(b""),
    "file->4-bytes": lambda p, rng: p.write_bytes(p.read_bytes()[:4]),
    "file->8-bytes": lambda p, rng: p.write_bytes(p.read_bytes()[:8]),
    "file->header-only": lambda p, rng: p.write_bytes(p.read_bytes()[:8 + struct.unpack("<Q", p.read_bytes()[:8])[0]]),
    "file->truncated-by-one": lambda p, rng: p.write_bytes(p.read_bytes()[:-1]),
    "file->one-extra-byte": lambda p, rng: p.write_bytes(p.read_bytes() + b"\0"),
    "file->a-directory": _shard_to_dir,
    "file->symlink-outside-copy": _shard_symlink("outside-copy"),
    "file->dangling-symlink": _shard_symlink("dangling"),
    "file->symlink-loop": _shard_symlink("loop"),
    "file->symlink-to-dir": _shard_symlink("to-dir"),
    "file->deleted": lambda p, rng: p.unlink(),
}


def header_kinds(rng: random.Random) -> dict[str, Callable]:
    kinds = {}
    for name, edit in HEADER_EDITS.items():
        tensor = rng.choice(MATRICES if name.startswith(("data", "dtype", "shape")) else TENSORS)
        kinds[f"header[{short(tensor)}]:{name}"] = header_kind(tensor, edit)
    for name, edit in FILE_EDITS.items():
        tensor = rng.choice(TENSORS)
        kinds[f"shard[{short(tensor)}]:{name}"] = file_kind(tensor, edit)
    return kinds


def random_header_kinds(seeds: range) -> list[Mutation]:
    out = []
    for seed in seeds:
        r = random.Random(seed)
        tensor = r.choice(TENSORS)
        kind = r.choice(["flip-header", "flip-data", "flip-N", "truncate", "json-edit"])
        if kind == "flip-data":
            fn = header_kind(tensor, _data_flip(r.randint(1, 3)))
        elif kind == "flip-header":
            fn = file_kind(tensor, _header_flip)
        elif kind == "flip-N":
            fn = file_kind(tensor, lambda p, rng: flip_bytes(p, rng, 1, 0, 8))
        elif kind == "truncate":
            fn = file_kind(tensor, truncate)
        else:
            fn = file_kind(tensor, _header_random_edit)
        out.append(Mutation(f"header[{short(tensor)}]:random-{kind}#{seed}", fn, seed))
    return out


def random_json_kinds(target: str, rel: str, seeds: range) -> list[Mutation]:
    out = []
    for seed in seeds:
        kind = random.Random(seed).choice(["flip", "json-edit", "json-edit"])
        if kind == "flip":
            fn = lambda folder, rng, rel=rel: flip_bytes(folder / rel, rng, rng.randint(1, 4))  # noqa: E731
        else:
            fn = json_file_random_edit(rel)
        out.append(Mutation(f"{target}:random-{kind}#{seed}", fn, seed))
    return out


# -- config.json ----------------------------------------------------------------------------------------

CONFIG_VALUES = [
    ("num_hidden_layers", [0, -1, 2, 99, "3", 3.5, None]),
    ("hidden_size", [-64, 0, 65, "64"]),
    ("vocab_size", [319, 0, None]),
    ("num_attention_heads", [0, 3, -4]),
    ("num_key_value_heads", [0, 3]),
    ("head_dim", [0, -16]),
    ("intermediate_size", [0, -1]),
    ("max_position_embeddings", [0, 8, "x"]),
    ("rms_norm_eps", [-1, None]),
    ("architectures", [["JunkForCausalLM"], "LlamaForCausalLM", [1, None]]),
    ("model_type", ["junk", None, "bert", "mistral"]),
    ("rope_parameters", ["junk", {"rope_type": "junk"}, {}]),
    ("rope_scaling", [{"rope_type": "linear", "factor": "x"}]),
    ("tie_word_embeddings", [True]),
    ("dtype", ["float33", "int8"]),
    ("hidden_act", ["junk"]),
    ("attention_bias", [True]),
    ("eos_token_id", [10**6]),
]
CONFIG_DELETE = ["num_hidden_layers", "hidden_size", "vocab_size", "model_type", "rope_parameters",
                 "intermediate_size"]
STRICT_CONFIG = {("num_hidden_layers", n): 2 for n in (-1, 0, 2)}  # the checkpoint holds blocks config.json lacks


def config_kinds() -> dict[str, tuple[Callable, int | None]]:
    kinds: dict[str, tuple[Callable, int | None]] = {}
    for key, values in CONFIG_VALUES:
        for v in values:
            strict = STRICT_CONFIG.get((key, v)) if type(v) is int else None
            kinds[f"config:{key}->{json.dumps(v)}"] = (
                edit_json("config.json", lambda o, k=key, v=v: o.__setitem__(k, v)), strict)
    for key in CONFIG_DELETE:
        kinds[f"config:delete-{key}"] = (edit_json("config.json", lambda o, k=key: o.pop(k, None)), None)
    for name, fn in json_file_kinds("config.json").items():
        kinds[f"config:{name}"] = (fn, None)
    kinds["config:nan-literal"] = (write_bytes("config.json", lambda b: b.replace(b'"rms_norm_eps": 1e-05',
                                                                                 b'"rms_norm_eps": NaN')), None)
    return kinds


# -- extra / missing checkpoint tensors ------------------------------------------------------------------

def _add_tensors(make: Callable[[dict], dict], in_index: bool = True, new_shard: bool = True):
    """Add tensors ``make(existing tensors)`` to the checkpoint: in a new shard (or the last one) and the index."""
    def fn(folder: Path, rng: random.Random) -> str:
        from safetensors.torch import load_file, save_file

        wm = weight_map(folder)
        existing = {}
        for shard in sorted(set(wm.values())):
            existing.update(load_file(str(folder / shard)))
        extra = make(existing)
        if new_shard:
            name = "model-extra.safetensors"
            save_file(extra, str(folder / name), metadata={"format": "pt"})
        else:
            name = sorted(set(wm.values()))[-1]
            held = load_file(str(folder / name))
            save_file({**held, **extra}, str(folder / name), metadata={"format": "pt"})
        if in_index:
            idx = load(folder / INDEX)
            idx["weight_map"].update({k: name for k in extra})
            idx["metadata"]["total_size"] += sum(t.numel() * t.element_size() for t in extra.values())
            dump(folder / INDEX, idx)
        return f"added {sorted(extra)} to {name}" + ("" if in_index else " (not in the index)")
    return fn


def _layer3(names: list[str]):
    return lambda ex: {f"model.layers.3.{s}": ex[f"model.layers.2.{s}"].clone() for s in names}


def _inv_freq(ex: dict) -> dict:
    import torch

    inv = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    return {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": inv.clone() for i in range(LAYERS)}


def _drop_from_shard(tensor: str):
    def fn(folder: Path, rng: random.Random) -> None:
        from safetensors.torch import load_file, save_file

        path = shard_of(folder, tensor)
        held = load_file(str(path))
        held.pop(tensor)
        if held:
            save_file(held, str(path), metadata={"format": "pt"})
        else:
            path.write_bytes(struct.pack("<Q", 2) + b"{}")
    return fn


def tensor_mutations() -> list[Mutation]:
    import torch

    return [
        Mutation("tensors:extra-layer-3-q_proj", _add_tensors(_layer3(["self_attn.q_proj.weight"])), expect=2),
        Mutation("tensors:extra-layer-3-block", _add_tensors(_layer3(BLOCK)), expect=2),
        Mutation("tensors:extra-layer-3-in-last-shard-not-in-index",
                 _add_tensors(_layer3(["mlp.up_proj.weight"]), in_index=False, new_shard=False), expect=2),
        Mutation("tensors:rotary-inv-freq-buffers", _add_tensors(_inv_freq), expect=0),
        Mutation("tensors:rotary-inv-freq-buffers-in-last-shard", _add_tensors(_inv_freq, new_shard=False), expect=0),
        Mutation("tensors:extra-unknown-tensor",
                 _add_tensors(lambda ex: {"model.junk.weight": torch.zeros(4, 4)}), expect=2),
        Mutation("tensors:extra-q_proj-bias",
                 _add_tensors(lambda ex: {"model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}), expect=2),
        Mutation("tensors:extra-layer-01-leading-zero",
                 _add_tensors(lambda ex: {"model.layers.01.self_attn.q_proj.weight":
                                          ex["model.layers.1.self_attn.q_proj.weight"].clone()}), expect=2),
        Mutation("tensors:dropped-from-shard[layers.1.mlp.up_proj.weight]",
                 _drop_from_shard("model.layers.1.mlp.up_proj.weight")),
        Mutation("tensors:dropped-from-shard[norm.weight]", _drop_from_shard("model.norm.weight")),
    ]


# -- a finished run's manifest and report (verify) -------------------------------------------------------

def _each_done(f: Callable[[dict], None]):
    def edit(o):
        for entry in o["done"].values():
            f(entry)
    return edit


def _first_done(f: Callable[[dict], None]):
    def edit(o):
        f(next(iter(o["done"].values())))
    return edit


def manifest_kinds() -> dict[str, Callable]:
    kinds = {f"manifest:{k}": v for k, v in json_file_kinds(MANIFEST).items()}
    e = lambda edit: edit_json(MANIFEST, edit)  # noqa: E731
    kinds |= {
        "manifest:done->list": e(lambda o: o.__setitem__("done", list(o["done"].values()))),
        "manifest:done->string": e(lambda o: o.__setitem__("done", "all")),
        "manifest:done->null": e(lambda o: o.__setitem__("done", None)),
        "manifest:done->missing": e(lambda o: o.pop("done")),
        "manifest:entry->string": e(lambda o: o["done"].__setitem__(next(iter(o["done"])), "x")),
        "manifest:entries-lack-file": e(_each_done(lambda d: d.pop("file"))),
        "manifest:entry-lacks-size": e(_first_done(lambda d: d.pop("size"))),
        "manifest:entry-lacks-sha256": e(_first_done(lambda d: d.pop("sha256"))),
        "manifest:file->int": e(_first_done(lambda d: d.__setitem__("file", 3))),
        "manifest:file->list": e(_first_done(lambda d: d.__setitem__("file", ["a"]))),
        "manifest:file->null": e(_first_done(lambda d: d.__setitem__("file", None))),
        "manifest:file->dotdot": e(_first_done(lambda d: d.__setitem__("file", "../x.safetensors"))),
        "manifest:file->absolute": e(_first_done(lambda d: d.__setitem__("file", "/etc/hostname"))),
        "manifest:size->string": e(_first_done(lambda d: d.__setitem__("size", "many"))),
        "manifest:size->negative": e(_first_done(lambda d: d.__setitem__("size", -1))),
        "manifest:sha256->int": e(_first_done(lambda d: d.__setitem__("sha256", 7))),
        "manifest:complete->false": e(lambda o: o.__setitem__("complete", False)),
        "manifest:complete->string": e(lambda o: o.__setitem__("complete", "no")),
    }
    return kinds


def report_kinds() -> dict[str, Callable]:
    kinds = {f"report:{k}": v for k, v in json_file_kinds(REPORT).items()}
    e = lambda edit: edit_json(REPORT, edit)  # noqa: E731

    def first(o):
        return o["sparsity"]["per_linear"][next(iter(o["sparsity"]["per_linear"]))]

    kinds |= {
        "report:sparsity->list": e(lambda o: o.__setitem__("sparsity", [1])),
        "report:per_linear->list": e(lambda o: o["sparsity"].__setitem__("per_linear", [1, 2])),
        "report:per_linear->string": e(lambda o: o["sparsity"].__setitem__("per_linear", "abc")),
        "report:per_linear-entry->int": e(lambda o: o["sparsity"]["per_linear"].__setitem__(
            next(iter(o["sparsity"]["per_linear"])), 5)),
        "report:zeros->string": e(lambda o: first(o).__setitem__("zeros", "half")),
        "report:shape->string": e(lambda o: first(o).__setitem__("shape", "64x64")),
        "report:shape->null": e(lambda o: first(o).__setitem__("shape", None)),
        "report:extra-linear": e(lambda o: o["sparsity"]["per_linear"].__setitem__("model.layers.9.x.weight", {})),
        "report:missing-linear": e(lambda o: o["sparsity"]["per_linear"].pop(next(iter(o["sparsity"]["per_linear"])))),
    }
    for p in ["2:4", "0:4", "2:0", "4:2", "0:0", 5, None, "1:99999999999999999999"]:
        kinds[f"report:pattern->{json.dumps(p)}"] = e(lambda o, p=p: o.__setitem__("pattern", p))
    return kinds


# -- the case lists -------------------------------------------------------------------------------------

# controls: the same JSON written with other whitespace and key order must still be accepted
CONTROLS = [
    Mutation("index:control-reformatted", lambda f, rng: (f / INDEX).write_text(
        json.dumps(load(f / INDEX), indent=None, sort_keys=True)), expect=0),
    Mutation("config:control-reformatted", lambda f, rng: (f / "config.json").write_text(
        json.dumps(load(f / "config.json"), indent=7, sort_keys=True)), expect=0),
]


def _mutations(kinds: dict[str, Callable]) -> list[Mutation]:
    return [Mutation(k, fn) for k, fn in kinds.items()]


def cases() -> dict[str, list[tuple[Mutation, str]]]:
    """{command: [(mutation, method)]}: every input mutation once, spread over prune (about 30%: each
    successful prune costs ~1 s) and eval (the same read path, cheaper); config mutations and a few others
    for plan; damage to a finished output for verify. About 380 cases."""
    rng = random.Random(1234)
    index = _mutations(index_kinds(rng)) + random_json_kinds("index", INDEX, range(100, 106))
    header = _mutations(header_kinds(rng)) + random_header_kinds(range(200, 210))
    config = [Mutation(k, fn, expect=strict) for k, (fn, strict) in config_kinds().items()]
    config += random_json_kinds("config", "config.json", range(300, 304))
    tensors = tensor_mutations()

    prune: list[Mutation] = []
    evals: list[Mutation] = []
    for m in index + header + config:
        (prune if rng.random() < 0.3 or m.expect is not None else evals).append(m)
    prune += tensors + [CONTROLS[0]]
    evals += [m for m in tensors if m.expect is not None] + [CONTROLS[1]]
    plan = rng.sample([m for m in config if m.expect is None], 18) + rng.sample(index, 3) + rng.sample(header, 3)
    plan += [m for m in tensors if m.expect == 0][:1] + [CONTROLS[1]]

    verify = rng.sample(_mutations(index_kinds(random.Random(7))), 12)
    verify += random_json_kinds("index", INDEX, range(400, 403))
    verify += rng.sample(_mutations(header_kinds(random.Random(8))), 16) + random_header_kinds(range(500, 506))
    verify += rng.sample([m for m in config if m.expect is None], 6)
    verify += _mutations(manifest_kinds()) + random_json_kinds("manifest", MANIFEST, range(600, 602))
    verify += _mutations(report_kinds()) + random_json_kinds("report", REPORT, range(700, 702))

    methods = lambda ms: [(m, "wanda" if rng.random() < 0.2 else "magnitude") for m in ms]  # noqa: E731
    return {"prune": methods(prune), "eval": [(m, "") for m in evals],
            "plan": [(m, rng.choice(["magnitude", "wanda", "gblm"])) for m in plan],
            "verify": [(m, "") for m in verify]}


def summary_problems(outcomes: dict[str, tuple[str, int, int]], total: int) -> list[str] | None:
    """The campaign is not vacuous: prune, eval and plan each reached a success and a refusal, verify refused a
    folder that is not a finished run and caught damage, and every case hashed the files it must not change.
    ``outcomes``: case id -> (command, exit code, files hashed). None when not every one of ``total`` cases
    ran (a ``-k`` selection): nothing to judge."""
    if len(outcomes) < total:
        return None
    problems = [] if 250 <= total <= 500 else [f"{total} fuzz cases, 250..500 expected"]
    codes: dict[str, set[int]] = {}
    for command, code, _ in outcomes.values():
        codes.setdefault(command, set()).add(code)
    for command in ("prune", "eval", "plan"):
        if not {0, 2} <= codes.get(command, set()):
            problems.append(f"{command}: exit codes {codes.get(command)}, both 0 and 2 expected")
    if not {1, 2} <= codes.get("verify", set()):
        problems.append(f"verify: exit codes {codes.get('verify')}, both 1 (FAILED) and 2 expected")
    if min(hashed for _, _, hashed in outcomes.values()) < 10:
        problems.append("the no-change check looked at almost nothing")
    return problems
