"""No GPU runs here, so this reads the sources instead: every tensor that leaves torch for numpy must pass
through `.cpu()` first (`.numpy()` on a CUDA tensor raises), except values that are on the CPU by construction,
listed below with the reason."""
import ast

from lab.resources import ROOT

PACKAGES = ("quant", "lab", "bench", "demo_model")
# (file, source of the receiver of .numpy()) -> why it is on the CPU already
CPU_BY_CONSTRUCTION = {
    ("lab/generation.py", "to_audio(fp.denoised[i])[0]"): "lab.sat.decoder returns CPU tensors",
    ("lab/generation.py", "to_audio(q.denoised[i])[0]"): "lab.sat.decoder returns CPU tensors",
}


def sources():
    files = [ROOT / "app.py"] + [path for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))]
    return [(path.relative_to(ROOT).as_posix(), path.read_text()) for path in files]


def passes_through_cpu(node: ast.AST) -> bool:
    """True when the method chain that `node` ends has a `.cpu()` call in it."""
    while isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "cpu":
            return True
        node = node.func if isinstance(node, ast.Call) else node.value
    return False


def numpy_calls_off_the_cpu():
    found = []
    for name, text in sources():
        for node in ast.walk(ast.parse(text)):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy"
                    and not node.args and not passes_through_cpu(node.func.value)):
                receiver = ast.get_source_segment(text, node.func.value)
                if (name, receiver) not in CPU_BY_CONSTRUCTION:
                    found.append(f"{name}:{node.lineno}: {receiver}.numpy()")
    return found


def test_every_numpy_conversion_passes_through_cpu():
    assert numpy_calls_off_the_cpu() == []


def test_the_scan_finds_a_conversion_without_cpu(tmp_path, monkeypatch):
    module = tmp_path / "lab" / "example.py"
    module.parent.mkdir()
    module.write_text("def f(x):\n    return x.detach().numpy(), x.cpu().numpy(), x.float().cpu()[0].numpy()\n")
    (tmp_path / "app.py").write_text("")
    monkeypatch.setattr("tests.test_device_safety.ROOT", tmp_path)
    assert numpy_calls_off_the_cpu() == ["lab/example.py:2: x.detach().numpy()"]


def test_the_allow_list_names_only_existing_code():
    texts = dict(sources())
    for (name, receiver), reason in CPU_BY_CONSTRUCTION.items():
        assert receiver + ".numpy()" in texts[name], (name, receiver, reason)
