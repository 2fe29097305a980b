"""agent.service.prewarm: imports done in a background thread, once per process."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_prewarm_imports_in_the_background_once_and_survives_a_missing_module() -> None:
    # A child interpreter: the modules must not be imported yet, whatever the test session imported.
    code = textwrap.dedent("""
        import sys, threading, time
        from agent.service.prewarm import prewarm
        assert "xml.dom.minidom" not in sys.modules
        prewarm(("no_such_module_here", "xml.dom.minidom"))
        prewarm(("xml.dom.minidom",))           # already started: no second thread
        names = [t.name for t in threading.enumerate() if t.name == "prewarm"]
        assert len(names) <= 1, names
        deadline = time.monotonic() + 60
        while "xml.dom.minidom" not in sys.modules and time.monotonic() < deadline:
            time.sleep(0.01)
        import xml.dom.minidom                    # waits for the background import if still running
        assert xml.dom.minidom.parseString("<a/>").documentElement.tagName == "a"
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
