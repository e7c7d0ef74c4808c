"""patch_dc / patch_mtt swap the drop-ins into a module and restore the originals."""
import types

import pytest

from ddfast.compat import dc, mtt, patch


def _fake_utils():
    mod = types.ModuleType("utils")
    for name in set(dc.__all__) | {"unrelated"}:
        setattr(mod, name, f"original {name}")
    return mod


def test_patch_dc_replaces_only_existing_names_and_restores():
    assert dc.__all__, "compat.dc exports nothing"
    mod = _fake_utils()
    delattr(mod, dc.__all__[0])
    done = patch.patch_dc(mod)
    assert set(done) == set(dc.__all__[1:])
    for name in done:
        assert getattr(mod, name) is getattr(dc, name)
    assert not hasattr(mod, dc.__all__[0]) and mod.unrelated == "original unrelated"
    patch.unpatch(mod)
    for name in dc.__all__[1:]:
        assert getattr(mod, name) == f"original {name}"


def test_patched_context_manager_for_mtt():
    mod = types.ModuleType("distill_utils")
    for name in mtt.__all__:
        setattr(mod, name, name)
    with patch.patched(mod, "mtt"):
        for name in mtt.__all__:
            assert getattr(mod, name) is getattr(mtt, name)
    for name in mtt.__all__:
        assert getattr(mod, name) == name


def test_patch_rejects_non_modules_and_unknown_codebases():
    with pytest.raises(TypeError, match="module"):
        patch.patch_dc({"match_loss": 1})
    with pytest.raises(ValueError, match="codebase"):
        with patch.patched(types.ModuleType("m"), "cafe"):
            pass
