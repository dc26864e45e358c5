"""Setup step: put GPT-2's BPE ranks in data/tokenizer/gpt2.tiktoken so training works offline.

tiktoken downloads these ranks from an OpenAI blob store, which many machines cannot
reach. The same file ships inside the openai-whisper source package on PyPI, so we
fetch that package with pip (which only needs the package index), take the one file
out, and check it against the pinned sha256 before keeping it.

    python scripts/fetch_tokenizer.py [--dir data/tokenizer]
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


from moe_gpt.config import PROJECT_ROOT, ConfigError
from moe_gpt.data.tokenizer import GPT2_RANKS_SHA256, RANKS_FILENAME
from moe_gpt.errors import CommandFailed
from moe_gpt.cli.common import ArgumentParser, entry_point

WHISPER_SDIST = "openai-whisper==20250625"
MEMBER_SUFFIX = "/whisper/assets/gpt2.tiktoken"


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tiktoken_has_gpt2() -> bool:
    """Whether tiktoken can already build gpt2 from its own cache or the network (informational)."""
    import tiktoken

    try:
        tiktoken.get_encoding("gpt2")
        return True
    except Exception:  # offline: a ConnectionError; we fetch our own copy either way
        return False


def download_sdist(workdir: Path) -> Path:
    """Download the whisper source archive (no dependencies, no wheels) into ``workdir``."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", WHISPER_SDIST]
    command += ["-d", str(workdir)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise CommandFailed(f"`pip download {WHISPER_SDIST}` failed ({last_line}); check that PyPI is reachable")
    archives = sorted(workdir.glob("*.tar.gz"))
    if not archives:
        raise CommandFailed(
            f"pip downloaded no .tar.gz for {WHISPER_SDIST} into {workdir}; check pip's configuration"
        )
    return archives[0]


def extract_ranks(archive: Path) -> bytes:
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(MEMBER_SUFFIX):
                return tar.extractfile(member).read()
    raise CommandFailed(f"{archive.name} has no *{MEMBER_SUFFIX}; the pinned package version may have changed")


def write_atomically(data: bytes, target: Path) -> None:
    # A temp file in the same directory, then a rename: readers never see a partial file.
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes it owner-only; this is a public file
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


@entry_point(runs_model=False)
def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=PROJECT_ROOT / "data" / "tokenizer", help="where gpt2.tiktoken goes")
    target = parser.parse_args(argv).dir / RANKS_FILENAME

    if target.is_file():
        if sha256_of(target.read_bytes()) == GPT2_RANKS_SHA256:
            print(f"{target} is already present and verified; nothing to do")
            return
        # Never replace a file we did not write: the user may want to look at it first.
        raise ConfigError(f"{target} exists but is not GPT-2's ranks (sha256 mismatch); move it away and rerun")

    if tiktoken_has_gpt2():
        print("tiktoken can already load gpt2 here; fetching a local copy anyway for offline runs")
    with tempfile.TemporaryDirectory() as workdir:
        print(f"downloading {WHISPER_SDIST} (source archive) with pip ...")
        data = extract_ranks(download_sdist(Path(workdir)))
    if sha256_of(data) != GPT2_RANKS_SHA256:
        raise CommandFailed(
            f"gpt2.tiktoken from {WHISPER_SDIST} has sha256 {sha256_of(data)}, not the pinned GPT-2 hash; refusing it"
        )
    write_atomically(data, target)
    print(f"wrote {target} ({len(data)} bytes, sha256 verified)")


if __name__ == "__main__":
    raise SystemExit(main())
