# Copyright (c) 2026, fla-mesa contributors. MIT license.
r"""
Writes fla-mesa's op, layer and model into an fla source checkout as the replacement of fla's MesaNet
(`fla/ops/mesa_net/`, `fla/layers/mesa_net.py`, `fla/models/mesa_net/`), then runs fla's own tests of it
(`tests/ops/test_mesa.py`, `tests/models/test_modeling_mesanet.py`) there. See docs/upstream.md.

    git clone --branch v0.6.0 https://github.com/fla-org/flash-linear-attention /tmp/fla   # a throwaway checkout
    python scripts/upstream.py --fla /tmp/fla --test --report benchmarks/results/upstream_fla_tests.md

What changes on the way in: imports (`fla_mesa.ops.mesa` -> `fla.ops.mesa_net`, ...), the model's class names and
model type (`MesaConfig` -> `MesaNetConfig`, ..., `'mesa'` -> `'mesa_net'`), and fla's two test references
(`naive_mesa_net_exact`, `naive_mesa_net_decoding_one_step`) carried over from fla's own `naive.py` into the new one,
so fla's tests import what they import today; and in fla's tests, `MesaNetConfig` off `MODELING_UNSUPPORTED_VARLEN`.
Nothing else: a file that still names `fla_mesa` stops the script.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module paths, longest first: fla-mesa's -> fla's
MODULES = [
    ('fla_mesa.modules.projections', 'fla.modules.fused_linears'),
    ('fla_mesa.modules', 'fla.modules.fused_linears'),
    ('fla_mesa.models.mesa_net', 'fla.models.mesa_net'),
    ('fla_mesa.layers.mesa_net', 'fla.layers.mesa_net'),
    ('fla_mesa.ops.mesa', 'fla.ops.mesa_net'),
    ('fla_mesa.models', 'fla.models.mesa_net'),
    ('fla_mesa.layers', 'fla.layers.mesa_net'),
    ('fla_mesa.ops', 'fla.ops'),
    # package-level helpers, if any remain, go next to the op as a module of their own
    ('fla_mesa.utils', 'fla.ops.mesa_net.plugin_utils'),
]
# fla-mesa's model names -> fla's
CLASSES = {
    'MesaConfig': 'MesaNetConfig',
    'MesaModel': 'MesaNetModel',
    'MesaForCausalLM': 'MesaNetForCausalLM',
    'MesaPreTrainedModel': 'MesaNetPreTrainedModel',
    'MesaBlock': 'MesaNetBlock',
}
TESTS = ['tests/ops/test_mesa.py', 'tests/models/test_modeling_mesanet.py']


def rewrite(text: str, rename_classes: bool = False) -> str:
    for ours, theirs in MODULES:
        text = re.sub(rf'\b{re.escape(ours)}\b', theirs, text)
    if rename_classes:
        for ours, theirs in CLASSES.items():
            text = re.sub(rf'\b{ours}\b', theirs, text)
        text = re.sub(r"model_type = 'mesa'", "model_type = 'mesa_net'", text)
    return text


def exported_names(init: Path) -> list[str]:
    """`__all__` of a package's `__init__.py`, read without importing it."""
    names = []
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, 'id', None) == '__all__' for t in node.targets):
            names = list(ast.literal_eval(node.value))
        elif isinstance(node, ast.AugAssign) and getattr(node.target, 'id', None) == '__all__':
            names += list(ast.literal_eval(node.value))
    if not names:
        raise SystemExit(f"{init}: no __all__ found")
    return names


def fla_references(naive: Path, names: list[str]) -> tuple[str, str]:
    """The source of fla's own naive functions among `names` (the references fla's tests import), with their imports."""
    source = naive.read_text()
    tree = ast.parse(source)
    nodes = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    used = {x.id for n in nodes for x in ast.walk(n) if isinstance(x, ast.Name)}
    # only the imports these functions use (the file may already be a rewritten one, with imports of its own)
    imports = [
        ast.get_source_segment(source, n) for n in tree.body
        if isinstance(n, (ast.Import, ast.ImportFrom)) and getattr(n, 'module', None) != '__future__'
        and any((a.asname or a.name.split('.')[0]) in used for a in n.names)
    ]
    return '\n'.join(imports), '\n\n\n'.join(ast.get_source_segment(source, n) for n in nodes)


def write_ops(fla: Path) -> list[str]:
    target = fla / 'fla/ops/mesa_net'
    fla_all = exported_names(target / '__init__.py')
    ours = ROOT / 'fla_mesa/ops/mesa'
    ours_all = exported_names(ours / '__init__.py')
    kept = [name for name in fla_all if name not in ours_all]
    imports, functions = fla_references(target / 'naive.py', kept)
    missing = sorted(set(kept) - set(re.findall(r'^def (\w+)', functions, re.M)))
    if missing:
        raise SystemExit(f"fla exports {missing} from fla.ops.mesa_net, found neither in fla-mesa nor in fla's naive.py")

    shutil.rmtree(target)
    target.mkdir()
    for path in sorted(ours.glob('*.py')) + [ours / 'README.md']:
        (target / path.name).write_text(rewrite(path.read_text()))
    helpers = ROOT / 'fla_mesa/utils.py'
    if helpers.exists():
        (target / 'plugin_utils.py').write_text(rewrite(helpers.read_text()))
    if kept:
        naive = target / 'naive.py'
        naive.write_text(
            naive.read_text().rstrip() + '\n\n\n' + imports + '\n\n\n'
            + "# fla's own references, kept for fla's tests (fla/ops/mesa_net/naive.py before this change)\n\n"
            + functions + '\n'
        )
        init = target / '__init__.py'
        init.write_text(
            init.read_text().rstrip() + '\n\n'
            + f"from fla.ops.mesa_net.naive import {', '.join(kept)}  # noqa: E402\n\n"
            + f"__all__ += {kept!r}\n"
        )
    return kept


def write_layer_and_model(fla: Path):
    (fla / 'fla/layers/mesa_net.py').write_text(rewrite((ROOT / 'fla_mesa/layers/mesa_net.py').read_text()))
    # the layer's one-GEMM projections: a module of fla's own (nothing in it is Mesa's)
    (fla / 'fla/modules/fused_linears.py').write_text(rewrite((ROOT / 'fla_mesa/modules/projections.py').read_text()))
    target = fla / 'fla/models/mesa_net'
    shutil.rmtree(target)
    target.mkdir()
    for path in sorted((ROOT / 'fla_mesa/models/mesa_net').glob('*.py')):
        (target / path.name).write_text(rewrite(path.read_text(), rename_classes=True))


def enable_varlen_tests(fla: Path) -> bool:
    """Takes MesaNetConfig off fla's `MODELING_UNSUPPORTED_VARLEN` (fla-mesa's model takes `cu_seqlens`), as the pull
    request would; fla's model tests skip their varlen and backward checks for the configs listed there."""
    path = fla / 'tests/models/test_modeling_utils.py'
    if not path.exists():
        return False
    text = path.read_text()
    found = re.search(r'MODELING_UNSUPPORTED_VARLEN\s*=\s*\[(.*?)\]', text, re.S)
    if found is None or '"MesaNetConfig"' not in found.group(1):
        return False
    body = re.sub(r'"MesaNetConfig",\s*', '', found.group(1))
    path.write_text(text[:found.start(1)] + body + text[found.end(1):])
    return True


def check_no_plugin_names(fla: Path):
    written = list((fla / 'fla/ops/mesa_net').glob('*')) + list((fla / 'fla/models/mesa_net').glob('*.py'))
    written += [fla / 'fla/layers/mesa_net.py', fla / 'fla/modules/fused_linears.py']
    left = [f"{p.relative_to(fla)}: {line.strip()}" for p in written for line in p.read_text().splitlines()
            if 'fla_mesa' in line and p.suffix == '.py']
    if left:
        raise SystemExit("still naming fla_mesa after the rewrite (add a mapping to MODULES):\n" + '\n'.join(left))


def fla_version(fla: Path) -> str:
    found = re.search(r'__version__\s*=\s*[\'"]([^\'"]+)', (fla / 'fla/__init__.py').read_text())
    return found.group(1) if found else 'unknown'


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(['git', *args], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else 'unknown'


def run_tests(fla: Path, pytest_args: list[str], report: Path | None) -> int:
    # the checkout's fla, not an installed one
    env = {**os.environ, 'PYTHONPATH': str(fla)}
    where = subprocess.run([sys.executable, '-c', 'import fla, sys; sys.stdout.write(fla.__file__)'],
                           cwd=fla, env=env, capture_output=True, text=True)
    if where.returncode != 0 or not where.stdout.startswith(str(fla.resolve())):
        raise SystemExit(f"importing fla from {fla} failed or found another fla:\n{where.stdout}{where.stderr}")
    # one process per file: fla's test_mesa.py sets torch's default device to CUDA in a test and leaves it so, which
    # breaks the model tests' weight initialisation when they run after it in the same process
    cmds, lines, rc = [], [], 0
    for test in TESTS:
        cmd = [sys.executable, '-m', 'pytest', test, '-q', '-rA', '-p', 'no:cacheprovider', *pytest_args]
        print('$', ' '.join(cmd), f'(in {fla})', flush=True)
        proc = subprocess.Popen(cmd, cwd=fla, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            sys.stdout.write(line)
            lines.append(line)
        rc = rc or proc.wait()
        cmds.append(cmd)
    if report is not None:
        write_report(fla, report, cmds, lines, rc)
    return rc


def write_report(fla: Path, report: Path, cmds: list[list[str]], lines: list[str], rc: int):
    import torch
    import triton
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else f'none (CPU: {platform.processor() or "?"})'
    summary = [line.rstrip() for line in lines if re.match(r'^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b', line)]
    totals = [line.strip(' =\n') for line in lines if re.match(r'^=* ?\d+ (passed|failed|errors?)\b', line)]
    final = '; '.join(totals) if totals else 'no summary line'
    # COMMIT=...: where the files were copied to the GPU machine without their git history
    commit = os.environ.get('COMMIT') or git(ROOT, 'rev-parse', 'HEAD')
    dirty = not os.environ.get('COMMIT') and git(ROOT, 'status', '--porcelain')
    header = [
        "# fla's MesaNet tests on fla-mesa's op, layer and model",
        '',
        f"Written by `scripts/upstream.py` on {datetime.date.today()}: fla-mesa commit {commit}"
        f"{' (with uncommitted changes)' if dirty else ''}, written into an fla checkout "
        f"of version {fla_version(fla)}, git {git(fla, 'describe', '--tags', '--always')} ({git(fla, 'rev-parse', 'HEAD')}).",
        f"GPU: {gpu}; torch {torch.__version__}, triton {triton.__version__}, Python {platform.python_version()}.",
        '',
        "Commands (in the checkout, `PYTHONPATH` set to it), one process per test file:",
        *[f"`python {shlex.join(cmd[1:])}`" for cmd in cmds],
        f"Exit status {rc}; {final}",
        '',
        '```',
        *summary,
        '```',
        '',
    ]
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text('\n'.join(header))
    print(f"report written to {report}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--fla', type=Path, required=True, help='an fla source checkout (with tests/); its MesaNet is replaced')
    p.add_argument('--test', action='store_true', help="then run fla's MesaNet tests there")
    p.add_argument('--report', type=Path, default=None, help='with --test: write the results (markdown) here')
    p.add_argument('pytest_args', nargs='*', help='more pytest arguments, after --, e.g. -- -x -k chunk')
    args = p.parse_args()
    fla = args.fla.resolve()
    for rel in ['fla/ops/mesa_net/__init__.py', 'fla/ops/mesa_net/naive.py', 'fla/layers/mesa_net.py',
                'fla/models/mesa_net/__init__.py', *(TESTS if args.test else [])]:
        if not (fla / rel).exists():
            raise SystemExit(f"{fla} is not an fla checkout with MesaNet: {rel} is missing "
                             "(already replaced? start from a fresh checkout)")
    kept = write_ops(fla)
    write_layer_and_model(fla)
    check_no_plugin_names(fla)
    if enable_varlen_tests(fla):
        print("took MesaNetConfig off tests/models/test_modeling_utils.py's MODELING_UNSUPPORTED_VARLEN")
    print(f"wrote fla/ops/mesa_net/, fla/layers/mesa_net.py, fla/models/mesa_net/ in {fla}"
          + (f"; kept fla's references {kept} in naive.py" if kept else ''))
    if args.test:
        sys.exit(run_tests(fla, args.pytest_args, args.report))


if __name__ == '__main__':
    main()
