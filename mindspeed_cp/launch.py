"""Run an unmodified Megatron-LM script with the plugin loaded first.

::

    torchrun --nproc-per-node 8 -m mindspeed_cp.launch pretrain_gpt.py --context-parallel-size 8 ...
    python -m mindspeed_cp.launch $MEGATRON_LM_PATH/pretrain_gpt.py --help

What it does, in this order:

1. finds the script: the path as given, else relative to ``$MEGATRON_LM_PATH``;
2. makes Megatron-LM importable without letting its ``megatron/core`` shadow an installed megatron-core:
   the script's folder and ``$MEGATRON_LM_PATH`` go to the END of ``sys.path`` (after site-packages; also
   when they are the current directory). ``megatron`` is a namespace package, so ``megatron.core`` comes
   from site-packages when megatron-core is installed (else from the checkout) and ``megatron.training`` /
   ``megatron.legacy`` from the checkout. A version mismatch between the two is reported on stderr;
3. ``import mindspeed_cp.megatron_adaptor`` (patches megatron.core and megatron.training);
4. runs the script as ``__main__`` (``runpy.run_path``) with ``sys.argv = [script, *args]``.

Exit status 2 with one line on stderr when the script cannot be found.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
from typing import List, Optional

USAGE = (
    "usage: python -m mindspeed_cp.launch SCRIPT [SCRIPT ARGS...]\n"
    "       torchrun [torchrun options] -m mindspeed_cp.launch SCRIPT [SCRIPT ARGS...]\n"
    "Runs SCRIPT (e.g. pretrain_gpt.py; relative paths are also looked up in $MEGATRON_LM_PATH) as __main__\n"
    "after `import mindspeed_cp.megatron_adaptor`, so Megatron-LM's parser has the context-parallel flags.\n"
)

ENV = "MEGATRON_LM_PATH"


class LaunchError(Exception):
    """Bad launcher input: one line, exit status 2."""


def resolve_script(script: str, megatron_lm_path: Optional[str] = None) -> str:
    """Absolute path of ``script``: as given, else under ``megatron_lm_path`` (``$MEGATRON_LM_PATH``)."""
    root = megatron_lm_path if megatron_lm_path is not None else os.environ.get(ENV)
    candidates = [script]
    if root and not os.path.isabs(script):
        candidates.append(os.path.join(root, script))
    for path in candidates:
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = (
        f" or in ${ENV}={root}"
        if root and not os.path.isabs(script)
        else (f" (set ${ENV} to a Megatron-LM checkout to look there)" if not os.path.isabs(script) else "")
    )
    raise LaunchError(f"script {script!r} not found in {os.getcwd()}{where}")


def _same(a: str, b: str) -> bool:
    try:
        return os.path.realpath(a or os.curdir) == os.path.realpath(b)
    except OSError:
        return False


def prepare_sys_path(dirs: List[str]) -> None:
    """Move (or add) ``dirs`` to the end of ``sys.path``, after site-packages."""
    dirs = [os.path.abspath(d) for d in dict.fromkeys(dirs) if d]
    sys.path[:] = [p for p in sys.path if not any(_same(p, d) for d in dirs)]
    sys.path.extend(dirs)


def _checkout_core_version(root: str) -> Optional[str]:
    info = os.path.join(root, "megatron", "core", "package_info.py")
    try:
        text = open(info, encoding="utf-8").read()
    except OSError:
        return None
    parts = [re.search(rf"^{k}\s*=\s*(\d+)", text, re.M) for k in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else None


def check_versions(root: str) -> Optional[str]:
    """A warning when the megatron-core that will be imported differs from the checkout's version."""
    import importlib.util

    want = _checkout_core_version(root)
    spec = importlib.util.find_spec("megatron.core")
    if want is None or spec is None or spec.origin is None:
        return None
    if os.path.realpath(spec.origin).startswith(os.path.realpath(root) + os.sep):
        return None  # the checkout's own megatron.core
    try:
        from megatron.core.package_info import __version__ as have
    except ImportError:
        return None
    if not have.startswith(want):
        return (
            f"mindspeed_cp.launch: warning: megatron-core {have} (installed, {os.path.dirname(spec.origin)}) "
            f"but the Megatron-LM checkout {root} is {want}: megatron.training may not match"
        )
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0 if argv else 2
    try:
        script = resolve_script(argv[0])
    except LaunchError as e:
        print(f"mindspeed_cp.launch: {e}", file=sys.stderr)
        return 2
    root = os.environ.get(ENV)
    prepare_sys_path([os.path.dirname(script)] + ([root] if root else []))
    warning = check_versions(root or os.path.dirname(script))
    if warning:
        print(warning, file=sys.stderr)

    import mindspeed_cp.megatron_adaptor as adaptor

    adaptor.apply()  # targets under megatron.training that were absent at an earlier import
    sys.argv = [script] + argv[1:]
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
