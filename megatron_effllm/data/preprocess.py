"""Raw text -> megatron-core indexed datasets (PREFIX.bin / PREFIX.idx), one document per sequence.

    summary = preprocess(["corpus/", "more.parquet"], "model.gguf", "data/train")

Inputs: JSON lines (``.jsonl``, ``.json``, optionally ``.gz``), ``.parquet`` files, and HF
``datasets`` folders (``datasets.save_to_disk``); a plain folder is searched recursively for
those. Each record's text field is tokenized with the source model's tokenizer (no special
tokens), EOS appended, and written with megatron-core's ``IndexedDatasetBuilder``. With
``split_by_domain`` every domain (the record's domain field, else the input's name) gets its own
prefix ``PREFIX_<domain>``, ready to be blended.

Next to each prefix, ``PREFIX.meta.json`` records the tokenizer identity, the document and token
counts and a fingerprint of the inputs, so readers can check tokenizer agreement and skip
re-tokenizing unchanged inputs. Outputs are written under temporary names and renamed at the end:
a failed run leaves no partial files and keeps what was there before.
"""
from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
import re
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

import numpy

from megatron_effllm import output_dir
from megatron_effllm.data.tokenizer import Tokenizer, load_tokenizer
from megatron_effllm.errors import UserError

META_FORMAT = "megatron_effllm.indexed/1"
JSONL_EXTS = (".jsonl", ".jsonl.gz", ".json", ".json.gz")
PARQUET_EXTS = (".parquet",)
_BATCH_CHARS = 1 << 20  # about 1 MB of text per encode call
_BATCH_DOCS = 256


@dataclass
class _Input:
    kind: str  # jsonl | parquet | hf
    path: str
    name: str  # default domain name: file name without its extension


@dataclass
class _Doc:
    text: str
    domain: str


def _strip_ext(name: str) -> str:
    for ext in sorted(JSONL_EXTS + PARQUET_EXTS, key=len, reverse=True):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def _is_hf_folder(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f))
               for f in ("state.json", "dataset_dict.json", "dataset_info.json"))


def _kind_of_file(path: str) -> Optional[str]:
    if path.endswith(JSONL_EXTS):
        return "jsonl"
    if path.endswith(PARQUET_EXTS):
        return "parquet"
    return None


def expand_inputs(inputs: Sequence[str]) -> list[_Input]:
    """Files and folders -> the ordered list of readable inputs (folders sorted, recursive)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise UserError("no input given; pass --input with jsonl/jsonl.gz/parquet files or folders")
    out: list[_Input] = []
    for path in inputs:
        if not os.path.exists(path):
            raise UserError(f"input {path} not found; check the path")
        if os.path.isdir(path):
            if _is_hf_folder(path):
                out.append(_Input("hf", path, os.path.basename(os.path.normpath(path))))
                continue
            found = []
            for root, dirs, files in os.walk(path):
                dirs.sort()
                hf_dirs = [d for d in dirs if _is_hf_folder(os.path.join(root, d))]
                for d in hf_dirs:
                    found.append(_Input("hf", os.path.join(root, d), d))
                dirs[:] = [d for d in dirs if d not in hf_dirs and not d.startswith(".")]
                for f in sorted(files):
                    kind = _kind_of_file(f)
                    if kind and not f.startswith("."):
                        found.append(_Input(kind, os.path.join(root, f), _strip_ext(f)))
            if not found:
                raise UserError(f"folder {path} holds no .jsonl, .jsonl.gz, .parquet files or HF "
                                "datasets folders; point --input at the data")
            out.extend(sorted(found, key=lambda i: i.path))
        else:
            kind = _kind_of_file(path)
            if kind is None:
                raise UserError(f"input {path} has an unknown extension; use .jsonl, .jsonl.gz, "
                                ".json(.gz), .parquet or an HF datasets folder")
            out.append(_Input(kind, path, _strip_ext(os.path.basename(path))))
    return out


def _check_text(value, where: str, text_key: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(f"{where}: field {text_key!r} holds bytes that are not valid UTF-8 "
                            f"(at byte {err.start}); re-encode the data as UTF-8") from None
    raise UserError(f"{where}: field {text_key!r} is {type(value).__name__}, expected a string; "
                    "fix the record or choose another --text-key")


def _missing(where: str, text_key: str, keys) -> UserError:
    keys = sorted(map(str, keys))
    shown = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "")
    return UserError(f"{where}: no field {text_key!r} (fields: {shown or 'none'}); pass "
                     "--text-key with the field that holds the text")


def _read_jsonl(inp: _Input, text_key: str, domain_key: Optional[str]) -> Iterator[_Doc]:
    opener = gzip.open if inp.path.endswith(".gz") else open
    try:
        with opener(inp.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{inp.path} line {lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise UserError(f"{where}: bytes are not valid UTF-8 (at byte {err.start}); "
                                    "re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{where}: not valid JSON ({err.msg}); the file must hold one "
                                    "JSON object per line") from None
                if not isinstance(record, dict):
                    raise UserError(f"{where}: expected a JSON object per line, got "
                                    f"{type(record).__name__}")
                if text_key not in record:
                    raise _missing(where, text_key, record.keys())
                text = _check_text(record[text_key], where, text_key)
                domain = record.get(domain_key) if domain_key else None
                yield _Doc(text, str(domain) if domain not in (None, "") else inp.name)
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise UserError(f"{inp.path}: not a valid gzip file ({err}); re-compress it or "
                        "give the plain .jsonl") from None


def _iter_columns(batches, inp: _Input, text_key: str, domain_key: Optional[str], have_domain: bool):
    row = 0
    for batch in batches:
        texts = batch[text_key]
        domains = batch[domain_key] if have_domain else None
        for i, value in enumerate(texts):
            row += 1
            where = f"{inp.path} row {row}"
            if value is None:
                raise UserError(f"{where}: field {text_key!r} is empty (null); drop the row or "
                                "fill it")
            text = _check_text(value, where, text_key)
            domain = domains[i] if domains is not None else None
            yield _Doc(text, str(domain) if domain not in (None, "") else inp.name)


def _read_parquet(inp: _Input, text_key: str, domain_key: Optional[str]) -> Iterator[_Doc]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(inp.path)
    except (pyarrow.ArrowException, OSError) as err:
        raise UserError(f"{inp.path}: not a readable parquet file ({str(err)[:120]})") from None
    names = pf.schema_arrow.names
    if text_key not in names:
        raise _missing(inp.path, text_key, names)
    have_domain = bool(domain_key) and domain_key in names
    columns = [text_key] + ([domain_key] if have_domain else [])
    try:
        batches = (b.to_pydict() for b in pf.iter_batches(batch_size=1024, columns=columns))
        yield from _iter_columns(batches, inp, text_key, domain_key, have_domain)
    except pyarrow.ArrowException as err:
        raise UserError(f"{inp.path}: could not read the parquet data ({str(err)[:120]})") from None


def _read_hf(inp: _Input, text_key: str, domain_key: Optional[str]) -> Iterator[_Doc]:
    import datasets

    try:
        ds = datasets.load_from_disk(inp.path)
    except Exception as err:  # datasets raises several unrelated types for a bad folder
        why = str(err).strip().splitlines()[0][:120] if str(err).strip() else type(err).__name__
        raise UserError(f"{inp.path}: not a readable HF datasets folder ({why})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = list(ds.keys())
        if len(splits) != 1:
            raise UserError(f"{inp.path} holds several splits ({', '.join(splits)}); point --input "
                            f"at one of them, e.g. {os.path.join(inp.path, splits[0])}")
        ds = ds[splits[0]]
    names = ds.column_names
    if text_key not in names:
        raise _missing(inp.path, text_key, names)
    have_domain = bool(domain_key) and domain_key in names
    columns = [text_key] + ([domain_key] if have_domain else [])
    batches = ds.select_columns(columns).iter(batch_size=1024)
    yield from _iter_columns(batches, inp, text_key, domain_key, have_domain)


_READERS = {"jsonl": _read_jsonl, "parquet": _read_parquet, "hf": _read_hf}


def iter_documents(inputs: Sequence[str], text_key: str = "text",
                   domain_key: Optional[str] = "domain") -> Iterator[_Doc]:
    """Every non-empty document of the inputs, in order. An input with none is an error."""
    for inp in expand_inputs(inputs):
        count = 0
        for doc in _READERS[inp.kind](inp, text_key, domain_key):
            if doc.text:
                count += 1
                yield doc
        if count == 0:
            raise UserError(f"{inp.path} holds no documents (no non-empty {text_key!r} values); "
                            "remove it from the inputs")


def _batches(docs: Iterator[_Doc]) -> Iterator[list[_Doc]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


# --- worker processes: the tokenizer is inherited (fork) or loaded once per worker (spawn) ---
_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _worker_init(path: str, eos_token: Optional[str]) -> None:
    global _WORKER_TOKENIZER
    if _WORKER_TOKENIZER is None:
        _WORKER_TOKENIZER = load_tokenizer(path, eos_token)


def _worker_encode(texts: list[str]) -> list[list[int]]:
    return _WORKER_TOKENIZER.encode_batch(texts)


def index_dtype(vocab_size: int):
    """The token dtype megatron-core's preprocessing uses for a vocabulary of this size."""
    from megatron.core.datasets.indexed_dataset import DType

    return DType.optimal_dtype(vocab_size)


def sanitize_domain(domain: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", domain).strip("._") or "domain"
    return name


def inputs_fingerprint(inputs: Sequence[str]) -> list[dict]:
    """Path, size and modification time of every input file (to detect changed inputs)."""
    out = []
    for inp in expand_inputs(inputs):
        files = [inp.path] if inp.kind != "hf" else sorted(
            os.path.join(inp.path, f) for f in os.listdir(inp.path))
        for f in files:
            st = os.stat(f)
            out.append({"path": os.path.abspath(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


class _PrefixWriter:
    """One output prefix, written under temporary names until ``commit``."""

    def __init__(self, prefix: str, dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefix = prefix
        self.dtype = dtype
        self.tmp = {ext: f"{prefix}{ext}.tmp" for ext in (".bin", ".idx", ".meta.json")}
        parent = os.path.dirname(os.path.abspath(prefix))
        try:
            os.makedirs(parent, exist_ok=True)
            self.builder = IndexedDatasetBuilder(self.tmp[".bin"], dtype=dtype)
        except OSError as err:
            raise UserError(f"cannot write {prefix}.bin ({err.strerror}); choose a writable "
                            "--out-prefix") from None
        self.documents = 0
        self.tokens = 0
        self.domains: dict[str, int] = {}

    def add(self, ids: list[int], domain: str) -> None:
        self.builder.add_document(numpy.asarray(ids, dtype=self.dtype), [len(ids)])
        self.documents += 1
        self.tokens += len(ids)
        self.domains[domain] = self.domains.get(domain, 0) + 1

    def finish(self, meta: dict) -> None:
        """Write the index and metadata under temporary names (renamed by ``commit``)."""
        self.builder.finalize(self.tmp[".idx"])
        meta = dict(meta, documents=self.documents, tokens=self.tokens,
                    dtype=numpy.dtype(self.dtype).name, domains=self.domains)
        with open(self.tmp[".meta.json"], "w") as f:
            json.dump(meta, f, indent=1)

    def commit(self) -> None:
        # The metadata goes last: its presence marks a complete .bin/.idx pair.
        for ext in (".bin", ".idx", ".meta.json"):
            os.replace(self.tmp[ext], self.prefix + ext)

    def abort(self) -> None:
        try:
            self.builder.data_file.close()
        except Exception:
            pass
        for path in self.tmp.values():
            if os.path.exists(path):
                os.remove(path)


def preprocess(inputs: Sequence[str], tokenizer: Union[str, Tokenizer], out_prefix: str,
               text_key: str = "text", append_eos: bool = True, prepend_bos: bool = False,
               split_by_domain: bool = False, domain_key: Optional[str] = "domain",
               workers: int = 1, eos_token: Optional[str] = None,
               progress: bool = True) -> dict:
    """Tokenize ``inputs`` into ``out_prefix`` (.bin/.idx/.meta.json); see the module docstring.

    Returns {"outputs": {domain or "all": {"prefix", "documents", "tokens"}}, "documents",
    "tokens", "seconds", "tokens_per_s"}.
    """
    global _WORKER_TOKENIZER
    if workers < 1:
        raise UserError(f"workers must be >= 1, got {workers}")
    if not out_prefix or out_prefix.endswith(("/", os.sep)):
        raise UserError(f"--out-prefix {out_prefix!r} must name files (e.g. data/train), not a folder")
    if out_prefix.endswith((".bin", ".idx")):
        out_prefix = out_prefix[:-4]
    expand_inputs(inputs)  # fail on bad paths before loading the tokenizer
    for ext in ("", ".bin", ".idx", ".meta.json", ".domains.json"):
        output_dir.check_not_input(out_prefix + ext, inputs, "--out-prefix")
    tok = load_tokenizer(tokenizer, eos_token) if isinstance(tokenizer, str) else tokenizer
    if prepend_bos and tok.bos_id is None:
        raise UserError(f"tokenizer {tok.name} has no BOS token; drop --prepend-bos")
    dtype = index_dtype(tok.vocab_size)
    meta_base = {
        "format": META_FORMAT, "tokenizer": tok.identity(), "text_key": text_key,
        "append_eos": append_eos, "prepend_bos": prepend_bos,
        "inputs": inputs_fingerprint(inputs),
    }

    writers: dict[str, _PrefixWriter] = {}
    names: dict[str, str] = {}  # sanitized file name -> domain, to refuse collisions

    def writer_for(domain: str) -> _PrefixWriter:
        key = domain if split_by_domain else ""
        w = writers.get(key)
        if w is None:
            if split_by_domain:
                safe = sanitize_domain(domain)
                if safe in names and names[safe] != domain:
                    raise UserError(f"domains {names[safe]!r} and {domain!r} map to the same file "
                                    f"name {safe!r}; rename one of them")
                names[safe] = domain
                w = _PrefixWriter(f"{out_prefix}_{safe}", dtype)
            else:
                w = _PrefixWriter(out_prefix, dtype)
            writers[key] = w
        return w

    def emit(batch: list[_Doc], encoded: list[list[int]]) -> None:
        for doc, ids in zip(batch, encoded):
            if prepend_bos:
                ids = [tok.bos_id] + ids
            if append_eos:
                ids = ids + [tok.eos_id]
            if ids:
                writer_for(doc.domain).add(ids, doc.domain)
        if bar is not None:
            bar.update(len(batch))

    bar = None
    pool = None
    t0 = time.perf_counter()
    try:
        if progress:
            from tqdm import tqdm

            bar = tqdm(unit="doc", desc=f"tokenizing -> {os.path.basename(out_prefix)}",
                       dynamic_ncols=True)
        batches = _batches(iter_documents(inputs, text_key, domain_key))
        if workers == 1:
            for batch in batches:
                emit(batch, tok.encode_batch([d.text for d in batch]))
        else:
            if "fork" in mp.get_all_start_methods():
                # Children inherit the loaded tokenizer: no per-worker reload.
                ctx, _WORKER_TOKENIZER = mp.get_context("fork"), tok
            else:
                ctx = mp.get_context("spawn")
            pool = ctx.Pool(workers, initializer=_worker_init, initargs=(tok.path, eos_token))
            pending: deque = deque()
            for batch in batches:
                pending.append((batch, pool.apply_async(_worker_encode, ([d.text for d in batch],))))
                while len(pending) > 2 * workers:  # bounded read-ahead
                    b, res = pending.popleft()
                    emit(b, res.get())
            while pending:
                b, res = pending.popleft()
                emit(b, res.get())
        if not writers:
            raise UserError("the inputs hold no documents; check --input and --text-key")
        for domain, w in writers.items():
            w.finish(dict(meta_base, domain=domain or None))
        for w in writers.values():
            w.commit()
    except BaseException as err:
        for w in writers.values():
            w.abort()
        failed = output_dir.write_error(err, out_prefix + ".bin", os.path.exists(out_prefix + ".bin"))
        if failed is not None:  # a full disk or a read-only location: one line
            raise failed from None
        raise
    finally:
        _WORKER_TOKENIZER = None
        if pool is not None:
            pool.terminate()
            pool.join()
        if bar is not None:
            bar.close()
    seconds = time.perf_counter() - t0
    outputs = {(k or "all"): {"prefix": w.prefix, "documents": w.documents, "tokens": w.tokens}
               for k, w in writers.items()}
    if split_by_domain:
        manifest = {k: w.prefix for k, w in writers.items()}
        tmp = f"{out_prefix}.domains.json.tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(tmp, f"{out_prefix}.domains.json")
    documents = sum(w.documents for w in writers.values())
    tokens = sum(w.tokens for w in writers.values())
    return {"outputs": outputs, "documents": documents, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else float("inf")}


def read_meta(prefix: str) -> Optional[dict]:
    """The metadata written next to a prefix by ``preprocess`` (None for foreign datasets)."""
    path = prefix + ".meta.json"
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path} is unreadable; delete it and preprocess the data again") from None
    if meta.get("format") != META_FORMAT:
        raise UserError(f"{path} has format {meta.get('format')!r}, expected {META_FORMAT}; "
                        "preprocess the data again")
    return meta
