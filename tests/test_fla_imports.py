# Copyright (c) 2026, fla-mesa contributors. MIT license.
"""
Every name fla_mesa imports from fla, read from the source: public (in the module's `__all__`, or bound by a package's
`__init__` that declares none), or one of the private names listed here and in docs/upstream.md with the reason it
stays. An fla release that moves or changes one of these fails here by name, not deep inside a kernel call.
"""

import ast
import importlib
import inspect
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (module, name) -> a check of what fla_mesa relies on (docs/upstream.md, "fla internals", says why each stays)
PRIVATE = {
    ('fla.layers.utils', 'get_layer_cache'): lambda f: list(inspect.signature(f).parameters)[:2] == ['module', 'past_key_values'],
    ('fla.layers.utils', 'update_layer_cache'): lambda f: list(inspect.signature(f).parameters)[:2] == ['module', 'past_key_values'],
    ('fla.layers.utils', 'unpad_hidden_states'): callable,
    ('fla.layers.utils', 'repad_hidden_states'): callable,
    ('fla.models.configuration_utils', 'AttentionConfig'): lambda t: t is not None,
    ('fla.models.configuration_utils', 'AttentionConfigBase'): inspect.isclass,
    ('fla.models.configuration_utils', 'validate_attnres_config'): callable,
    ('fla.models.configuration_utils', 'validate_loss_config'): lambda f: {'fuse_cross_entropy', 'fuse_linear_cross_entropy'}
    <= set(inspect.signature(f).parameters),
    ('fla.models.modeling_utils', 'FLAForCausalLM'): inspect.isclass,
    ('fla.models.modeling_utils', 'FLAModel'): inspect.isclass,
    ('fla.models.modeling_utils', 'FLAPreTrainedModel'): inspect.isclass,
    ('fla.models.modeling_utils', 'get_attention'): lambda f: list(inspect.signature(f).parameters) == ['config', 'layer_idx'],
    ('fla.modules.l2warp', 'l2_warp'): callable,
}


def fla_imports(folders=('fla_mesa',), names_only=True):
    """
    (module, name, file) for every `from fla... import name` in `folders`, at any depth (also lazy imports).
    `names_only`: a plain `import fla...` fails (the package imports names; the tools may `import fla` for its version).
    """
    found = []
    for path in sorted(p for folder in folders for p in (ROOT / folder).rglob('*.py')):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] == 'fla':
                found += [(node.module, alias.name, path.relative_to(ROOT).as_posix()) for alias in node.names]
            elif isinstance(node, ast.Import) and names_only:
                assert all(a.name.split('.')[0] != 'fla' for a in node.names), f"{path}: import a name from fla"
    return found


def is_public(module_name, name):
    module = importlib.import_module(module_name)
    if hasattr(module, '__all__'):
        return name in module.__all__
    return hasattr(module, '__path__') and hasattr(module, name)


def test_every_fla_import_is_public_or_listed():
    imports = fla_imports()
    assert imports, 'found no import from fla: the scan is broken'
    unlisted = [(m, n, f) for m, n, f in imports if not is_public(m, n) and (m, n) not in PRIVATE]
    assert not unlisted, f"private fla names not in PRIVATE and docs/upstream.md: {unlisted}"
    stale = set(PRIVATE) - {(m, n) for m, n, _ in imports}
    assert not stale, f"listed as private but no longer imported: {stale}"


@pytest.mark.parametrize('module_name, name', sorted(PRIVATE), ids=lambda x: x)
def test_private_fla_name(module_name, name):
    obj = getattr(importlib.import_module(module_name), name)
    assert not is_public(module_name, name), f"{module_name}.{name} is public now: drop it from PRIVATE and the docs"
    assert PRIVATE[module_name, name](obj), f"{module_name}.{name} is not what fla_mesa relies on any more"
    doc = (ROOT / 'docs' / 'upstream.md').read_text()
    assert f'`{module_name}`' in doc and name in doc, f"docs/upstream.md gives no reason for {module_name}.{name}"


def test_tools_fla_imports_resolve():
    """
    The benchmarks, scripts and examples import fla's ops (the peers they time) inside try blocks that turn a failure
    into an "n/a" cell: a name fla does not have (a renamed module or function) would pass unnoticed there.
    """
    imports = fla_imports(('benchmarks', 'scripts', 'examples'), names_only=False)
    assert imports, 'found no import from fla: the scan is broken'
    missing = []
    for module_name, name, path in imports:
        module = importlib.import_module(module_name)
        if not hasattr(module, name):
            try:
                importlib.import_module(f'{module_name}.{name}')
            except ImportError:
                missing.append((path, module_name, name))
    assert not missing, f"fla has no such name: {missing}"
