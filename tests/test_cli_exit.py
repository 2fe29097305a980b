"""agent/cli.py `_exit`: the console script leaves without the interpreter's teardown, and a user sees no
difference: the exit code, everything printed (also to a file or a pipe, where stdout is block-buffered),
the atexit handlers' work (logging's last lines), and a thread still running is waited for as by
`sys.exit`. Each case is a real Python process."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(tmp_path: Path, body: str) -> tuple[int, str, str]:
    script = tmp_path / "prog.py"
    script.write_text(textwrap.dedent(body))
    out, err = tmp_path / "out.txt", tmp_path / "err.txt"
    with open(out, "wb") as fo, open(err, "wb") as fe:      # files: block-buffered, as under a redirect
        code = subprocess.run([sys.executable, str(script)], stdout=fo, stderr=fe, cwd=REPO, timeout=60,
                              check=False).returncode
    return code, out.read_text(), err.read_text()


def test_exit_keeps_code_output_atexit_and_log_lines(tmp_path):
    code, out, err = _run(tmp_path, f"""
        import atexit, logging, sys
        sys.path.insert(0, {str(REPO)!r})
        from agent.cli import _exit
        log_file = {str(tmp_path / "agent.log")!r}
        logging.basicConfig(filename=log_file, level=logging.INFO)   # flushed and closed by logging's atexit
        atexit.register(lambda: print("atexit ran"))
        print("x" * 100000)                                           # more than one buffer
        print("last line")
        logging.getLogger("t").info("logged before exit")
        sys.stderr.write("to stderr")
        _exit(3)
        print("never")
    """)
    assert code == 3
    assert out == "x" * 100000 + "\nlast line\natexit ran\n"
    assert err == "to stderr"
    assert "logged before exit" in (tmp_path / "agent.log").read_text()


def test_exit_waits_for_a_running_thread_as_sys_exit_does(tmp_path):
    code, out, _ = _run(tmp_path, f"""
        import sys, threading, time
        sys.path.insert(0, {str(REPO)!r})
        from agent.cli import _exit

        def late():
            time.sleep(0.3)
            print("thread finished")

        threading.Thread(target=late).start()
        _exit(0)
    """)
    assert code == 0 and out == "thread finished\n"
