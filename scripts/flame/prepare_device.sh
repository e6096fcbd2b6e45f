#!/usr/bin/env bash
# Here (a machine with the package registry), from anywhere: puts into ignored folders of the repo what a GPU
# machine with no network needs to run flame on fla-mesa: flame's source (.flame/, from a git directory of
# fla-org/flame: FLAME_GIT) and the wheels that flame needs beyond the device image (.whl_flame/).
# Then on the device: run(carry=['.flame', '.whl_flame', '.whl'], command='NGPU=1 bash scripts/flame/run_gpu.sh').
set -euo pipefail
cd "$(dirname "$0")/../.."
FLAME_GIT=${FLAME_GIT:?set FLAME_GIT to a git directory of fla-org/flame (e.g. the fetch tool mirror)}

rm -rf .flame && mkdir .flame
git --git-dir "$FLAME_GIT" archive HEAD | tar -x -C .flame
git --git-dir "$FLAME_GIT" log -1 --format='flame %H %ad' > .flame/COMMIT

# torchtitan 0.1.0 holds flame's pinned commit 0b44d4c (5 commits before the tag) and needs tyro, which its wheel
# does not declare; datasets < 4 still takes flame's `trust_remote_code=True`
rm -rf .whl_flame && mkdir .whl_flame
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl_flame \
  torchtitan==0.1.0 torchdata==0.11.0 datasets==3.6.0 dill==0.3.8 multiprocess==0.70.16 fsspec==2025.3.0 \
  tyro==0.9.24 docstring-parser==0.18.0 typeguard==4.6.1 shtab==1.13.0
for d in /.flame/ /.whl_flame/; do grep -qxF "$d" .git/info/exclude || echo "$d" >> .git/info/exclude; done
cat .flame/COMMIT; ls .whl_flame
