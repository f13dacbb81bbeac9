"""`elas-serve data`: fetch a public-domain English corpus from Debian's package archive.

The corpus ships inside a Debian package as R data (`data/Rdata.rdx` + `Rdata.rdb`), e.g. Jane
Austen's six novels in `r-cran-janeaustenr` (package MIT, texts public domain). We never install
the package (it would pull in R): `apt-get download` fetches the .deb, its sha256 is checked
against the pinned value, the .deb (an `ar` archive holding `data.tar.xz`) is opened in Python,
and each R character vector is written as one UTF-8 text file, one line per element.

Output layout (`--out`, default `data/<corpus>`; never committed, `/data/` is git-ignored):
`train/<doc>.txt` (training documents), `heldout/<doc>.txt` (the novel left out of training),
`manifest.json` (package, version, .deb sha256, sha256 and size of every text).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import shutil
import struct
import subprocess
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class CorpusSpec:
    name: str
    package: str  # Debian package name
    version: str
    sha256: str  # of the .deb
    rdata_dir: str  # folder of Rdata.rdx / Rdata.rdb inside the package's data.tar
    heldout: str  # document left out of training
    description: str


CORPORA: dict[str, CorpusSpec] = {
    "austen": CorpusSpec(
        "austen", "r-cran-janeaustenr", "1.0.0-1",
        "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
        "usr/lib/R/site-library/janeaustenr/data", "persuasion",
        "Jane Austen's six novels (public domain), from Debian's r-cran-janeaustenr"),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_deb(spec: CorpusSpec, into: Path) -> Path:
    """`apt-get download <package>=<version>` into `into`; returns the .deb path."""
    if shutil.which("apt-get") is None:
        raise ValueError(f"apt-get not found: download {spec.package}_{spec.version}_all.deb from "
                         f"a Debian mirror yourself and pass it with --deb PATH")
    proc = subprocess.run(["apt-get", "download", f"{spec.package}={spec.version}"], cwd=into,
                          capture_output=True, text=True)
    debs = sorted(into.glob(f"{spec.package}_*.deb"))
    if proc.returncode != 0 or not debs:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValueError(f"apt-get download {spec.package}={spec.version} failed ({last}); run "
                         f"`apt-get update` first, or pass the .deb with --deb PATH")
    return debs[0]


def deb_members(deb: Path, prefix: str) -> dict[str, bytes]:
    """Files under `prefix` in a .deb's data archive, by path relative to `prefix`."""
    raw = deb.read_bytes()
    if raw[:8] != b"!<arch>\n":
        raise ValueError(f"{deb}: not a Debian package (no ar header)")
    pos, data_tar = 8, None
    while pos + 60 <= len(raw):
        name, size = raw[pos:pos + 16].decode().strip().rstrip("/"), int(raw[pos + 48:pos + 58])
        if name.startswith("data.tar"):
            data_tar = (name, raw[pos + 60:pos + 60 + size])
        pos += 60 + size + size % 2  # members are 2-byte aligned
    if data_tar is None:
        raise ValueError(f"{deb}: no data.tar member")
    if data_tar[0].endswith(".zst"):
        raise ValueError(f"{deb}: zstd-compressed data.tar is not supported")
    out = {}
    with tarfile.open(fileobj=io.BytesIO(data_tar[1]), mode="r:*") as tar:
        for member in tar.getmembers():
            path = member.name.lstrip("./")
            if member.isfile() and path.startswith(prefix.rstrip("/") + "/"):
                out[path[len(prefix.rstrip("/")) + 1:]] = tar.extractfile(member).read()
    return out


def read_rdata_strings(rdx: bytes, rdb: bytes) -> dict[str, list[str]]:
    """The character vectors of an R lazy-load database (`Rdata.rdx` index + `Rdata.rdb`)."""
    try:
        import rdata
    except ImportError:
        raise ValueError("reading R data needs the `rdata` package: "
                         "pip install 'elas-serve[train]'") from None

    def parse(blob: bytes):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Unknown file type: assumed RDS"
            return rdata.conversion.convert(rdata.parser.parse_data(blob))

    # NOTE: the .rdx is a gzip'd RDS; each .rdb entry is a 4-byte big-endian length + zlib data.
    index = parse(gzip.decompress(rdx) if rdx[:2] == b"\x1f\x8b" else zlib.decompress(rdx[4:]))
    docs = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset):int(offset) + int(length)]
        (expected,) = struct.unpack(">I", blob[:4])
        data = zlib.decompress(blob[4:])
        if len(data) != expected:
            raise ValueError(f"Rdata.rdb entry {name!r}: {len(data)} bytes, index says {expected}")
        value = parse(data)
        if getattr(value, "dtype", None) is None or value.dtype.kind not in "UO":
            continue  # not a character vector
        docs[str(name)] = ["" if s is None else str(s) for s in value]
    return docs


def fetch_corpus(name: str, out: Path, deb: Path | None = None, heldout: str | None = None,
                 spec: CorpusSpec | None = None) -> dict:
    """Fetch, verify and write corpus `name` under `out`; returns the manifest."""
    if spec is None:
        if name not in CORPORA:
            raise ValueError(f"unknown corpus {name!r} (available: {', '.join(CORPORA)})")
        spec = CORPORA[name]
    with tempfile.TemporaryDirectory() as tmp:
        if deb is None:
            deb = download_deb(spec, Path(tmp))
        elif not deb.is_file():
            raise ValueError(f"{deb}: no such file")
        digest = sha256_file(deb)
        if digest != spec.sha256:
            raise ValueError(f"{deb}: sha256 {digest} does not match the pinned {spec.sha256} "
                             f"of {spec.package} {spec.version}; refusing to use it")
        files = deb_members(deb, spec.rdata_dir)
        if "Rdata.rdx" not in files or "Rdata.rdb" not in files:
            raise ValueError(f"{deb}: no {spec.rdata_dir}/Rdata.rdx and Rdata.rdb")
        docs = read_rdata_strings(files["Rdata.rdx"], files["Rdata.rdb"])
    held = heldout or spec.heldout
    if held not in docs:
        raise ValueError(f"--heldout {held!r} is not a document of {name} "
                         f"(documents: {', '.join(sorted(docs))})")
    manifest = {"corpus": spec.name, "description": spec.description, "package": spec.package,
                "version": spec.version, "deb_sha256": digest, "heldout": held, "files": {}}
    for split in ("train", "heldout"):
        shutil.rmtree(out / split, ignore_errors=True)
        (out / split).mkdir(parents=True)
    for doc, lines in sorted(docs.items()):
        rel = f"{'heldout' if doc == held else 'train'}/{doc}.txt"
        text = "\n".join(lines).strip("\n") + "\n"
        (out / rel).write_text(text, encoding="utf-8")
        manifest["files"][rel] = {"chars": len(text),
                                  "sha256": hashlib.sha256(text.encode()).hexdigest()}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
