"""``python``: a code-execution tool run in a sandboxed subprocess.

Each call runs ``python -I -c <code>`` (isolated mode: no user site, no environment variables, no current
directory on the path) in a fresh temporary directory with a wall-clock timeout (the process group is killed),
CPU-time, memory (``RLIMIT_AS``), file-size and process-count limits (``resource.setrlimit``), and at most
``max_output`` bytes of output read (a runaway print loop is killed as soon as it passes them). A timeout, a
crash or runaway output comes back as the tool's text ("Error: ..."), never as an exception of the run.
Hand-written on the standard library (``subprocess``, ``resource``): no maintained library sandboxes a
subprocess in-process without a container. This is a resource sandbox, not a security boundary: the code can
still read the files the user can; run untrusted policies in a container.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading

from modalforge.rl.environment import ToolEnvironment


def run_python(code: str, *, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 2000) -> str:
    """What ``code`` prints (stdout and stderr), or an ``Error: ...`` line; never raises for the code's faults."""
    limit = memory_mb * 1024 * 1024

    def limits() -> None:  # in the child, before exec
        import resource

        os.setsid()
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        cpu = max(1, int(timeout) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    with tempfile.TemporaryDirectory(prefix="modalforge-python-") as folder:
        proc = subprocess.Popen([sys.executable, "-I", "-c", str(code)], cwd=folder, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=limits,
                                env={"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"})
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            _kill(proc)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            out = proc.stdout.read(max_output + 1)  # type: ignore[union-attr]
            runaway = len(out) > max_output
            if runaway:
                _kill(proc)
            proc.wait()
        finally:
            timer.cancel()
            proc.stdout.close()  # type: ignore[union-attr]
    text = out[:max_output].decode("utf-8", errors="replace")
    if timed_out.is_set():
        return f"Error: timed out after {timeout:g} s\n{text}".rstrip()
    if runaway:
        return f"{text}\nError: output longer than {max_output} bytes, stopped"
    if proc.returncode < 0:
        name = signal.Signals(-proc.returncode).name if -proc.returncode in signal.Signals._value2member_map_ else ""
        return f"{text}\nError: killed by signal {name or -proc.returncode} (a time or memory limit?)".strip()
    if proc.returncode != 0:
        tail = text.strip().splitlines()[-1] if text.strip() else ""
        return f"Error: exit code {proc.returncode}: {tail}" if "Error" in tail else \
            f"{text}\nError: exit code {proc.returncode}".strip()
    return text.strip()


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the child is its own process group leader (setsid)
    except (ProcessLookupError, PermissionError):
        pass


class PythonEnvironment(ToolEnvironment):
    """The ``python`` tool (``run_python`` with these limits); the episode ends at an answer without a tool call."""

    def __init__(self, max_turns: int = 3, timeout: float = 5.0, memory_mb: int = 512, max_output: int = 2000,
                 call_reward: float = 0.0) -> None:
        def python(code: str) -> str:
            """Run Python code and return what it prints.

            Args:
                code: a Python program; print the result
            """
            return run_python(code, timeout=timeout, memory_mb=memory_mb, max_output=max_output)

        super().__init__([python], max_turns=max_turns, call_reward=call_reward)

    def run_tool(self, name, arguments):  # noqa: ANN001, ANN201 - as ToolEnvironment's
        result = super().run_tool(name, arguments)
        if result.startswith("Error:") or "\nError:" in result:
            self.tool_errors += 1
        return result
