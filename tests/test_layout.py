"""The layout's promises, checked: `quant` stays a torch-only library, nothing patches sys.path, modules stay
readable in one sitting."""
import subprocess
import sys

from lab.resources import ROOT

PACKAGES = ("quant", "lab", "bench", "demo_model")
MAX_MODULE_LINES = 600


def python_files():
    return [ROOT / "app.py"] + [path for package in PACKAGES + ("tests",) for path in (ROOT / package).rglob("*.py")]


def test_quant_imports_none_of_the_app_stack():
    code = ("import sys, quant; heavy = ('stable_audio_tools', 'gradio', 'librosa', 'plotly'); "
            "print(sorted({m.split('.')[0] for m in sys.modules if m.split('.')[0] in heavy}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert loaded.stdout.strip() == "[]"


def test_nothing_patches_sys_path():
    needle = "sys.path." + "insert"  # split so this file does not match itself
    patched = [p.relative_to(ROOT).as_posix() for p in python_files()
               if needle in p.read_text() or "sys.path." + "append" in p.read_text()]
    assert patched == []


def test_no_module_is_over_the_line_budget():
    long = {p.relative_to(ROOT).as_posix(): n for p in python_files()
            if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
