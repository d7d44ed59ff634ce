"""The real ComfyUI host loads the pack: every node the pack defines is served by /object_info."""

import json
import subprocess
import sys

from comfy_host import PACK_DIR_NAME, REPO, comfyui_dir


def declared_nodes() -> dict:
    code = (
        "import importlib.util, json, os, sys\n"
        "sys.argv = ['probe', '--cpu']\n"
        "import comfy.options\n"
        "comfy.options.enable_args_parsing()\n"
        "sys.path.insert(0, os.getcwd())\n"
        f"spec = importlib.util.spec_from_file_location('opensora_pack', {str(REPO / '__init__.py')!r}, "
        f"submodule_search_locations=[{str(REPO)!r}])\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules['opensora_pack'] = module\n"
        "spec.loader.exec_module(module)\n"
        "import inspect\n"
        "out = {}\n"
        "for name, cls in module.NODE_CLASS_MAPPINGS.items():\n"
        "    types = cls.INPUT_TYPES()\n"
        "    out[name] = {k: sorted(types.get(k, {})) for k in ('required', 'optional')}\n"
        "    parameters = inspect.signature(getattr(cls, cls.FUNCTION)).parameters\n"
        "    out[name]['defaults'] = {\n"
        "        k: [spec[1].get('default') if len(spec) > 1 else None,\n"
        "            parameters[k].default if k in parameters else 'not in the signature']\n"
        "        for k, spec in types.get('optional', {}).items()\n"
        "    }\n"
        "print('JSON' + json.dumps(out))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=comfyui_dir(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("JSON")][-1]
    return json.loads(line[4:])


def test_object_info_lists_every_pack_node_with_its_inputs(comfy_server):
    declared = declared_nodes()
    assert len(declared) >= 8
    info = comfy_server.get_json("/object_info")
    for name, inputs in declared.items():
        assert name in info, f"{name} missing from /object_info"
        node = info[name]
        assert node["python_module"] == f"custom_nodes.{PACK_DIR_NAME}"
        assert node["category"].startswith("OpenSora")
        for section in ("required", "optional"):
            assert sorted(node["input"].get(section, {})) == inputs[section], (name, section)
            for input_name, spec in node["input"].get(section, {}).items():
                if len(spec) > 1 and isinstance(spec[1], dict) and input_name != "seed":
                    assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"
                # a tooltip longer than this covers a quarter of the canvas (audit 24); details go in the README
                tooltip = spec[1].get("tooltip", "") if len(spec) > 1 and isinstance(spec[1], dict) else ""
                assert len(tooltip) <= 420, f"{name}.{input_name}: tooltip of {len(tooltip)} characters"
    ours = {k for k, v in info.items() if v.get("python_module") == f"custom_nodes.{PACK_DIR_NAME}"}
    assert ours == set(declared)


def test_optional_inputs_default_in_the_signature_as_their_widgets():
    """One convention for optional inputs: each node function names them with the widget's default (None for a
    link input), so a prompt or a Python caller that omits one gets what the widget shows."""
    for name, inputs in declared_nodes().items():
        for input_name, (widget, signature) in inputs["defaults"].items():
            assert signature == widget, (name, input_name, widget, signature)


def test_pack_import_failure_is_detected(tmp_path):
    """A pack that fails to import must fail the harness, not just log a warning."""
    import pytest
    from comfy_host import ComfyServer

    broken = tmp_path / "broken"
    server = ComfyServer(base_dir=tmp_path / "base")
    server.prepare()
    link = server.base / "custom_nodes" / PACK_DIR_NAME
    link.unlink()
    (broken / "__init__.py").parent.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('deliberately broken')\n")
    link.symlink_to(broken, target_is_directory=True)
    with pytest.raises(RuntimeError, match="failed to import the pack"):
        server.start()
    server.stop()
