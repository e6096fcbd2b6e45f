# Copyright (c) 2026, fla-mesa contributors. MIT license.
r"""
A byte-level text corpus built offline from text nobody here wrote: the Python standard library's sources and the
`.py`, `.md`, `.rst`, `.txt` files of the installed packages (this project's own files left out).

Deterministic for a given Python installation: files are walked in sorted order (symlinks not followed), kept when
they are 64 bytes to 512 KiB of valid UTF-8, deduplicated by the sha256 of their content (the first in path order
kept), and split into train and validation *by file* on that hash (`--val-permille` of the files, whatever their
path), then laid out in hash order (a deterministic shuffle of the sources). Each file is preceded by a 0x00 byte
(a document boundary, never in the text). Writes `train.bin`, `val.bin` (raw bytes), `val_files.json` (each
validation file's offset, length and path) and `manifest.json` (roots, file counts, bytes, the sha256 of both
outputs, versions): two machines with the same installation build the same bytes, which the hashes show.

    python benchmarks/quality/byte_corpus.py --out /tmp/byte_corpus
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig

EXTENSIONS = ('.py', '.md', '.rst', '.txt')
PROJECT = os.path.realpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..'))
SEPARATOR = b'\x00'


def default_roots():
    paths = sysconfig.get_paths()
    roots = []
    for key in ('stdlib', 'purelib', 'platlib'):
        root = os.path.realpath(paths[key])
        if os.path.isdir(root) and root not in roots:
            roots.append(root)
    return roots


def own_file(path):
    """This project's files (the checkout, or fla_mesa installed or linked into site-packages)."""
    return path.startswith(PROJECT + os.sep) or 'fla_mesa' in path or '__editable__' in path


def walk(roots):
    """(label, path) of candidate files, sorted, without following links; a root inside another is walked once."""
    seen = set()
    for i, root in enumerate(roots):
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            real = os.path.realpath(folder)
            if real in seen:
                dirs[:] = []
                continue
            seen.add(real)
            # another root nested here is walked as its own root
            dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(folder, d)) not in roots
                       and d not in ('__pycache__', '.git')]
            for name in sorted(files):
                path = os.path.join(folder, name)
                if name.endswith(EXTENSIONS) and not os.path.islink(path) and not own_file(os.path.realpath(path)):
                    yield f'{i}/{os.path.relpath(path, root)}', path


def read_text(path, min_bytes, max_bytes):
    try:
        if not min_bytes <= os.path.getsize(path) <= max_bytes:
            return None
        with open(path, 'rb') as f:
            data = f.read()
        data.decode('utf-8')
    except (OSError, UnicodeDecodeError):
        return None
    return data if SEPARATOR not in data else None


def build(out, roots=None, val_permille=20, max_train_bytes=256 << 20, max_val_bytes=4 << 20, min_bytes=64,
          max_bytes=512 << 10, log=print):
    """Builds the corpus in `out` (see the module's docstring); returns the manifest."""
    if not 0 < val_permille < 1000:
        raise ValueError(f'val_permille must be in (0, 1000), got {val_permille}')
    roots = [os.path.realpath(r) for r in (roots or default_roots())]
    files, hashes, skipped, duplicates = [], set(), 0, 0
    for label, path in walk(roots):
        data = read_text(path, min_bytes, max_bytes)
        if data is None:
            skipped += 1
            continue
        digest = hashlib.sha256(data).hexdigest()
        if digest in hashes:
            duplicates += 1
            continue
        hashes.add(digest)
        files.append((digest, label, path))
    files.sort()
    os.makedirs(out, exist_ok=True)
    manifest = dict(roots=roots, extensions=EXTENSIONS, min_bytes=min_bytes, max_bytes=max_bytes,
                    val_permille=val_permille, candidates=len(files) + skipped + duplicates, skipped=skipped,
                    duplicates=duplicates, python=sys.version.split()[0])
    val_files = []
    for split, limit in (('train', max_train_bytes), ('val', max_val_bytes)):
        sha, size, count = hashlib.sha256(), 0, 0
        with open(os.path.join(out, f'{split}.bin'), 'wb') as f:
            for digest, label, path in files:
                if (int(digest[:8], 16) % 1000 < val_permille) != (split == 'val'):
                    continue
                data = SEPARATOR + read_text(path, min_bytes, max_bytes)
                if size + len(data) > limit:
                    continue
                if split == 'val':
                    val_files.append(dict(offset=size + 1, length=len(data) - 1, path=label))
                f.write(data)
                sha.update(data)
                size, count = size + len(data), count + 1
        manifest[split] = dict(files=count, bytes=size, sha256=sha.hexdigest())
        log(f'{split}: {count} files, {size:,} bytes, sha256 {sha.hexdigest()[:16]}…')
    with open(os.path.join(out, 'val_files.json'), 'w') as f:
        json.dump(val_files, f)
    with open(os.path.join(out, 'manifest.json'), 'w') as f:
        json.dump(manifest, f, indent=1)
    return manifest


def load_or_build(out, **kwargs):
    """The manifest of the corpus in `out`, built first if it is not there."""
    path = os.path.join(out, 'manifest.json')
    if not os.path.exists(path):
        return build(out, **kwargs)
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--out', default=os.path.join('/tmp', 'fla_mesa_byte_corpus'))
    p.add_argument('--roots', nargs='+', help='folders to walk (default: the stdlib and site-packages)')
    p.add_argument('--val-permille', type=int, default=20, help='validation files per thousand')
    p.add_argument('--max-train-mb', type=float, default=256)
    p.add_argument('--max-val-mb', type=float, default=4)
    args = p.parse_args(argv)
    manifest = build(args.out, args.roots, args.val_permille, int(args.max_train_mb * 2 ** 20),
                     int(args.max_val_mb * 2 ** 20))
    print(json.dumps(manifest, indent=1))


if __name__ == '__main__':
    main()
