"""patch_dc / patch_mtt swap the drop-ins into a module and restore the originals."""
import sys
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


def _dc_like_modules(monkeypatch):
    """A DatasetCondensation-like ``utils`` and a ``main`` that did ``from utils import ...``."""
    utils = types.ModuleType("ddtest_utils")

    def match_loss(gw_syn, gw_real, args):
        return "reference"

    def DiffAugment(x, strategy="", seed=-1, param=None):
        return "reference"

    def get_loops(ipc):
        return 1, 1

    utils.match_loss, utils.DiffAugment, utils.get_loops = match_loss, DiffAugment, get_loops
    main = types.ModuleType("ddtest_main")
    main.match_loss, main.DiffAugment, main.unrelated = match_loss, DiffAugment, "match_loss"
    monkeypatch.setitem(sys.modules, "ddtest_utils", utils)
    monkeypatch.setitem(sys.modules, "ddtest_main", main)
    return utils, main, (match_loss, DiffAugment)


def test_patch_dc_reaches_modules_that_imported_the_functions_by_name(monkeypatch):
    utils, main, (ref_match, ref_aug) = _dc_like_modules(monkeypatch)
    patch.patch_dc(utils)
    assert main.match_loss is dc.match_loss and main.DiffAugment is dc.DiffAugment
    assert utils.get_loops(1) == (1, 1) and main.unrelated == "match_loss"
    patch.unpatch(utils)
    assert main.match_loss is ref_match and main.DiffAugment is ref_aug and utils.match_loss is ref_match


def test_patch_mtt_refuses_a_datasetcondensation_module(monkeypatch):
    utils, main, (ref_match, _) = _dc_like_modules(monkeypatch)
    with pytest.raises(ValueError, match="patch_dc"):
        patch.patch_mtt(utils)
    assert main.match_loss is ref_match  # nothing was touched


def test_launcher_patches_before_the_script_imports(tmp_path, monkeypatch, capsys):
    (tmp_path / "utils.py").write_text(
        "def match_loss(gw_syn, gw_real, args):\n    return 'reference'\n"
        "def DiffAugment(x, strategy='', seed=-1, param=None):\n    return x\n")
    (tmp_path / "main.py").write_text(
        "import sys\nfrom utils import match_loss, DiffAugment\n"
        "print(match_loss.__module__, DiffAugment.__module__, sys.argv[1:])\n")
    monkeypatch.delitem(sys.modules, "utils", raising=False)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        assert patch.main(["dc", str(tmp_path / "main.py"), "--ipc", "10"]) == 0
    finally:
        sys.modules.pop("utils", None)
    out = capsys.readouterr().out.split()
    assert out[0].startswith("ddfast.compat") and out[1].startswith("ddfast.compat") and "'10']" in out[-1]
    assert patch.main(["cafe", "x.py"]) == 2
