"""Check a finished OUT_DIR: index vs shards, checksums vs the manifest, sparsity and N:M vs the
report, and that ``from_pretrained`` finds every key. Reads one shard at a time.

``verify(out_dir)`` returns one ``Check`` per property; it raises InputError only when OUT_DIR is
not a finished lowmem-gblm checkpoint at all (no folder, no index, no config.json).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem_gblm.errors import InputError
from lowmem_gblm.io.checkpoint import INDEX_NAME, read_header, read_tensors, read_weight_map
from lowmem_gblm.io.layout import family_for
from lowmem_gblm.io.model import load_hf_config
from lowmem_gblm.io.runstate import MANIFEST_NAME, REPORT_NAME, STATE_DIR, state_problem
from lowmem_gblm.io.writer import file_sha256

_BLOCK_MATRIX = re.compile(r"(?:^|\.)(?:layers|layer)\.(\d+)\..+\.weight$")  # decoder/vision layers; 1: block
_NM = re.compile(r"^(\d+):(\d+)$")


@dataclass
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.ok else 'FAIL'}  {self.name:<10} {self.detail}"


def _fail(problems: list[str], limit: int = 3) -> str:
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _read_json(path: Path):
    """The JSON in ``path``; ValueError (with the reason) when it cannot be read as JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(str(exc)) from exc


def _exists(path: Path) -> bool:
    """A regular file (not a symlink) at ``path``; False for a name the OS refuses."""
    try:
        return path.is_file() and not path.is_symlink()
    except OSError:
        return False


def _plain(name: str) -> bool:
    """A file name directly inside OUT_DIR (what the prune writes), nothing else."""
    return bool(name) and Path(name).name == name and name not in (".", "..")


def check_index(root: Path, weight_map: dict, total_size: int | None) -> tuple[Check, dict[str, dict]]:
    """Every weight_map entry in its shard, no extra tensors, total_size = sum of tensor bytes."""
    problems, headers, nbytes = [], {}, 0
    for shard in sorted(set(weight_map.values())):
        path = root / shard
        if not _plain(shard):
            problems.append(f"shard path {shard[:80]!r} is not a file name inside {root}")
            continue
        if not _exists(path):
            problems.append(f"shard {shard[:80]} is missing or not a regular file")
            continue
        try:
            header = read_header(path)
        except InputError as exc:
            problems.append(str(exc))
            continue
        headers[shard] = header
        held = {k for k in header if k != "__metadata__"}
        listed = {k for k, v in weight_map.items() if v == shard}
        problems += [f"{shard}: index lists {n!r}, the shard does not hold it" for n in sorted(listed - held)]
        problems += [f"{shard}: holds {n!r}, which the index does not list" for n in sorted(held - listed)]
        nbytes += sum(header[n]["data_offsets"][1] - header[n]["data_offsets"][0] for n in held)
    if total_size is None:
        problems.append("index metadata has no total_size")
    elif not problems and total_size != nbytes:
        problems.append(f"total_size {total_size} != {nbytes} bytes of tensors in the shards")
    detail = _fail(problems) if problems else f"{len(weight_map)} tensors in {len(headers)} shards, {nbytes} bytes"
    return Check("index", not problems, detail), headers


def check_checksums(root: Path, weight_map: dict) -> Check:
    path = root / STATE_DIR / MANIFEST_NAME
    if not path.is_file():
        return Check("checksums", False, f"no manifest at {path}; cannot check shard checksums")
    try:
        manifest = _read_json(path)
        problem = state_problem(manifest)
    except ValueError as exc:
        problem = str(exc)
    if problem:
        return Check("checksums", False, f"{path}: unreadable manifest ({problem})")
    entries = {e["file"]: e for e in manifest["done"].values()}
    problems = []
    for shard in sorted(set(weight_map.values())):
        entry, file = entries.get(shard), root / shard
        if entry is None:
            problems.append(f"{shard} is not in the manifest")
        elif not _plain(shard) or not _exists(file):
            problems.append(f"{shard} is missing")
        elif file.stat().st_size != entry["size"]:
            problems.append(f"{shard}: {file.stat().st_size} bytes, manifest says {entry['size']}")
        elif file_sha256(file) != entry["sha256"]:
            problems.append(f"{shard}: sha256 differs from the manifest")
    if manifest.get("complete") is not True:
        problems.append("the manifest does not mark the run complete")
    n = len(set(weight_map.values()))
    return Check("checksums", not problems, _fail(problems) if problems else f"{n} shards match sha256 and size")


def _nm_violations(w: torch.Tensor, n: int, m: int) -> int:
    """Groups of M consecutive input columns (per row) with more than N nonzeros."""
    if w.ndim != 2 or m <= 0 or w.shape[1] % m:
        return -1
    nonzero = (w != 0).reshape(w.shape[0], w.shape[1] // m, m).sum(-1)  # [out, in/M]
    return int((nonzero > n).sum())


def _report_problem(per_linear, skipped) -> str | None:
    if not isinstance(per_linear, dict):
        return "sparsity.per_linear is not an object"
    if not isinstance(skipped, list) or not all(isinstance(k, str) for k in skipped):
        return "skipped is not a list of names"
    for name, want in per_linear.items():
        shape, zeros = want.get("shape") if isinstance(want, dict) else None, None
        if isinstance(want, dict):
            zeros = want.get("zeros")
        if not isinstance(shape, list) or not isinstance(zeros, int) or isinstance(zeros, bool):
            return f"entry {name!r} needs a shape list and a zeros count"
    return None


def _family(root: Path):
    """The family row of the checkpoint in ``root`` (None when config.json names none we know)."""
    try:
        return family_for(load_hf_config(root))
    except InputError:
        return None


def check_sparsity(root: Path, weight_map: dict, headers: dict) -> list[Check]:
    """Recount zeros per linear against prune_report.json; N:M groups when the report's pattern is N:M. The report
    names linears as transformers' modules do; the index, as the checkpoint stores them (io.layout)."""
    path = root / REPORT_NAME
    if not path.is_file():
        return [Check("sparsity", False, f"no {REPORT_NAME}; cannot compare sparsity")]
    try:
        report = _read_json(path)
        per_linear = report["sparsity"]["per_linear"]
        skipped = report.get("skipped", [])  # left dense by --targets / --ignore
        pattern = str(report.get("pattern", "unstructured"))
        problem = _report_problem(per_linear, skipped)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        problem = str(exc) or type(exc).__name__
    if problem:
        return [Check("sparsity", False, f"{path}: unreadable report ({problem})")]
    family = _family(root)
    if family is not None:
        per_linear = {family.to_stored(k): v for k, v in per_linear.items()}
        skipped = [family.to_stored(k) for k in skipped]
    nm = _NM.match(pattern)
    problems, nm_problems, zeros, numel = [], [], 0, 0
    matrices = {k for k, s in weight_map.items()
                if _BLOCK_MATRIX.search(k) and k in headers.get(s, {}) and len(headers[s][k]["shape"]) == 2}
    routers = {k for k in matrices if _is_router(family, k)}  # a mixture of experts' router is never pruned
    problems += [f"{k} is a block matrix missing from the report"
                 for k in sorted(matrices - set(per_linear) - set(skipped) - routers)]
    problems += [f"report lists {k!r} as skipped, the index does not hold it as a block matrix"
                 for k in sorted(set(skipped) - matrices)]
    problems += [f"report lists {k!r} both as pruned and as skipped" for k in sorted(set(skipped) & set(per_linear))]
    counted: dict[str, tuple[int, int]] = {}  # stored name -> (zeros, numel) found in the shard
    by_shard: dict[str, list[str]] = {}
    for name in sorted(per_linear):
        if name not in weight_map:
            problems.append(f"report lists {name!r}, the index does not")
        elif name in headers.get(weight_map[name], {}):
            by_shard.setdefault(weight_map[name], []).append(name)
    for shard, names in sorted(by_shard.items()):
        try:
            tensors = read_tensors(root / shard, names)
        except InputError as exc:
            problems.append(str(exc))
            continue
        for name, w in tensors.items():
            want = per_linear[name]
            got = int((w == 0).sum())
            zeros, numel = zeros + got, numel + w.numel()
            counted[name] = got, w.numel()
            if list(w.shape) != list(want.get("shape", [])):
                problems.append(f"{name}: shape {list(w.shape)}, report says {want.get('shape')}")
            elif got != want.get("zeros"):
                problems.append(f"{name}: {got} zeros, report says {want.get('zeros')}")
            if nm:
                bad = _nm_violations(w, int(nm.group(1)), int(nm.group(2)))
                if bad:
                    nm_problems.append(f"{name}: {bad} groups break {pattern}" if bad > 0
                                       else f"{name}: columns not a multiple of {nm.group(2)}")
        del tensors
    overall = zeros / max(numel, 1)
    if not problems:  # every linear as reported: the report's sums must be these linears' sums
        problems += _summary_problems(report["sparsity"], counted, _num_blocks(root))
    checks = [Check("sparsity", not problems, _fail(problems) if problems else
                    f"{len(per_linear)} linears match the report, overall {overall:.4f}")]
    if nm:
        checks.append(Check("pattern", not nm_problems, _fail(nm_problems) if nm_problems else
                            f"every group of {nm.group(2)} keeps at most {nm.group(1)} in {len(per_linear)} linears"))
    return checks


def _is_router(family, name: str) -> bool:
    """``name`` is a mixture of experts' router (left dense: it is no linear the engine prunes)."""
    return family is not None and family.experts is not None and name.endswith("." + family.experts.router)


def _num_blocks(root: Path) -> int | None:
    try:
        n = getattr(load_hf_config(root), "num_hidden_layers", None)
    except InputError:
        return None
    return n if isinstance(n, int) else None


def _summary_problems(sparsity: dict, counted: dict[str, tuple[int, int]], num_blocks: int | None) -> list[str]:
    """The report's overall sparsity, zeros, weights and per-block sparsity against the sums of what the shards
    hold (``counted``: each reported linear's zeros and weights)."""
    zeros, numel = sum(z for z, _ in counted.values()), sum(n for _, n in counted.values())
    problems = []
    for key, want in (("zeros", zeros), ("numel", numel)):
        if sparsity.get(key) != want:
            problems.append(f"sparsity.{key} is {sparsity.get(key)!r}, the linears hold {want}")
    overall = sparsity.get("overall")
    if not _close(overall, zeros / max(numel, 1)):
        problems.append(f"sparsity.overall is {overall!r}, the linears give {zeros / max(numel, 1):.6f}")
    per_block = sparsity.get("per_block")
    if per_block is None or num_blocks is None:  # older reports have no per-block numbers
        return problems
    sums = [[0, 0] for _ in range(num_blocks)]
    for name, (z, n) in counted.items():
        match = _BLOCK_MATRIX.search(name)
        if match and int(match.group(1)) < num_blocks:
            sums[int(match.group(1))][0] += z
            sums[int(match.group(1))][1] += n
    want = [z / max(n, 1) for z, n in sums]
    if not isinstance(per_block, list) or len(per_block) != len(want):
        return [*problems, f"sparsity.per_block has {len(per_block) if isinstance(per_block, list) else '?'} "
                           f"entries, the model {len(want)} blocks"]
    problems += [f"sparsity.per_block[{i}] is {got!r}, block {i}'s linears give {w:.6f}"
                 for i, (got, w) in enumerate(zip(per_block, want, strict=True)) if not _close(got, w)]
    return problems


def _close(got, want: float) -> bool:
    return isinstance(got, (int, float)) and not isinstance(got, bool) and abs(got - want) <= 1e-9


def _tied_keys(model, config) -> set[str]:
    tied = getattr(model, "all_tied_weights_keys", None)  # transformers >= 5: {target: source}, only when tied
    if tied is not None:
        return set(tied)
    keys = getattr(model, "_tied_weights_keys", None) or []  # transformers 4.x: tied when the config says so
    return set(keys) if getattr(config, "tie_word_embeddings", False) else set()


def check_keys(root: Path, weight_map: dict, headers: dict) -> Check:
    """Build the model on the meta device from config.json; every key it loads must be in the index."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForImageClassification

    family = _family(root)
    task = family.task if family is not None else "causal_lm"
    auto = {"causal_lm": AutoModelForCausalLM,
            "image_classification": AutoModelForImageClassification}.get(task, AutoModel)
    try:
        config = AutoConfig.from_pretrained(str(root), trust_remote_code=False)
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=False)
    except Exception as exc:
        return Check("keys", False, f"cannot build the model from {root / 'config.json'} ({exc})")
    # the model's names as the checkpoint stores them (transformers 5 renames vision layers' modules on load, and
    # fuses a mixture of experts' per-expert matrices)
    rename = family.to_stored if family is not None else str
    state = stored_state({k: tuple(v.shape) for k, v in model.state_dict().items()}, family)
    needed = set(state) - {rename(k) for k in _tied_keys(model, config)}
    problems = [f"from_pretrained needs {k!r}, the index lacks it" for k in sorted(needed - set(weight_map))]
    problems += [f"index holds {k!r}, which the model does not load" for k in sorted(set(weight_map) - set(state))]
    for k in sorted(needed & set(weight_map)):
        shard = weight_map[k]
        if k in headers.get(shard, {}) and tuple(headers[shard][k]["shape"]) != state[k]:
            problems.append(f"{k}: shape {headers[shard][k]['shape']}, the model expects {list(state[k])}")
    tied = sorted(set(state) - needed)
    detail = f"{type(model).__name__}: all {len(needed)} keys found" + (f" ({', '.join(tied)} tied)" if tied else "")
    return Check("keys", not problems, _fail(problems) if problems else detail)


def stored_state(shapes: dict[str, tuple[int, ...]], family) -> dict[str, tuple[int, ...]]:
    """A model's state (transformers 5's names -> shapes) as checkpoints store it: names renamed (io.layout), and a
    mixture of experts' fused ``mlp.experts.gate_up_proj`` / ``down_proj`` and router split back into the stored
    per-expert matrices (ExpertLayout.stored_shapes), block by block."""
    if family is None:
        return dict(shapes)
    layout, out = family.experts, {}
    blocks: dict[str, dict[str, tuple[int, ...]]] = {}
    prefix = re.compile(rf"^({re.escape(family.layers_prefix)}\.\d+\.)(.+)$")
    for name, shape in shapes.items():
        match = prefix.match(name) if layout is not None else None
        if match:
            blocks.setdefault(match.group(1), {})[match.group(2)] = shape
        else:
            out[family.to_stored(name)] = shape
    for block, relative in blocks.items():
        if f"{layout.module}.gate_up_proj" in relative:
            relative = layout.stored_shapes(relative)
        out.update({family.to_stored(block + k): v for k, v in relative.items()})
    return out


def verify(out_dir: str | Path) -> list[Check]:
    root = Path(out_dir)
    if not root.is_dir():
        raise InputError(f"OUT_DIR {root} is not a folder")
    index_path = root / INDEX_NAME
    if not index_path.is_file():
        raise InputError(f"{root} has no {INDEX_NAME}: not a finished run (rerun the prune command to finish it)")
    if not (root / "config.json").is_file():
        raise InputError(f"{root} has no config.json: not a Hugging Face checkpoint")
    weight_map = read_weight_map(index_path)  # unreadable: InputError (exit 2)
    if not weight_map:
        raise InputError(f"{index_path}: an empty weight_map")
    metadata = _read_json(index_path).get("metadata")
    total_size = metadata.get("total_size") if isinstance(metadata, dict) else None
    index_check, headers = check_index(root, weight_map, total_size)
    checks = [index_check, check_checksums(root, weight_map)]
    checks += check_sparsity(root, weight_map, headers)
    checks.append(check_keys(root, weight_map, headers))
    return checks
