"""A user's training loop named in a job file: `package.module:function` or
`path/to/script.py:function`, found, imported and checked before anything starts.

A script path is read relative to the job file's folder (then the current directory). Every
problem is an EntrypointError naming the entry point and what is wrong with it: a file that
is not there, a module that fails to import (with its own error), a missing function, a
signature a Ray Train loop cannot have.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import inspect
import os
import site
import sys
import sysconfig
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Callable

from orchestrator.validation import expand_home


class EntrypointError(ValueError):
    """The entry point cannot be used; the message names it and says why."""


@dataclass(frozen=True)
class Entrypoint:
    """A loaded training loop. `from_file`: its module was loaded from a script path, so
    workers cannot import it by name and it must travel by value."""

    function: Callable
    module: ModuleType
    from_file: bool


def load_entrypoint(ref: str, base_dir: Path | None = None) -> Entrypoint:
    """The function `ref` names, imported and checked (see the module docstring)."""
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise EntrypointError(f"entrypoint must be 'package.module:function' or "
                              f"'path/to/script.py:function', got {ref!r}")
    where, name = ref.split(":")
    from_file = where.endswith(".py") or "/" in where
    module = _load_file(where, base_dir) if from_file else _import(where)
    function = getattr(module, name, None)
    if function is None:
        raise EntrypointError(f"entrypoint {ref!r}: {where} has no function {name!r}")
    if not callable(function):
        raise EntrypointError(f"entrypoint {ref!r}: {name} is a {type(function).__name__}, "
                              "not a function")
    try:
        accepts_config(function)
    except TypeError as e:
        raise EntrypointError(f"entrypoint {ref!r}: {e}") from None
    return Entrypoint(function, module, from_file)


def accepts_config(train_loop: Callable) -> bool:
    """True for loop(config), False for loop(); TypeError naming the function when it needs
    more than one argument (a Ray Train loop gets its config dict, or nothing)."""
    try:
        signature = inspect.signature(train_loop)
    except (TypeError, ValueError):
        raise TypeError(f"{train_loop!r} is not a function Ray Train can run") from None
    if inspect.isclass(train_loop):  # (a Tune Trainable, a class with __call__): the job
        # "succeeded" having made an instance and trained nothing
        raise TypeError(f"{train_loop.__qualname__} is a class: called, it only makes an "
                        "instance, and Ray Train runs nothing it returns; name a function (or "
                        "an instance made at the script's top level, if its class has "
                        "__call__)")
    kind = _not_run_by_a_call(train_loop)
    if kind:  # called, it returns a coroutine or generator and runs nothing: a silent success
        raise TypeError(f"{getattr(train_loop, '__qualname__', repr(train_loop))} is {kind}; "
                        "Ray Train calls the loop and runs nothing it returns: make it a "
                        "plain function (asyncio.run() inside it for async code)")
    positional = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    required_keywords = [p.name for p in signature.parameters.values()
                         if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    name = getattr(train_loop, "__qualname__", repr(train_loop))
    if len(required) > 1 or required_keywords:
        raise TypeError(f"{name}{signature} needs more than one argument; a training loop "
                        "takes its config dict, or nothing")
    return bool(positional) or any(p.kind is p.VAR_POSITIONAL
                                   for p in signature.parameters.values())


def _not_run_by_a_call(function: Callable) -> str | None:
    """What kind of function `function` is when calling it runs none of its body."""
    if inspect.isasyncgenfunction(function):
        return "an async generator"
    if inspect.iscoroutinefunction(function):
        return "an async function"
    if inspect.isgeneratorfunction(function):
        return "a generator (it yields)"
    return None


def _import(module_name: str) -> ModuleType:
    ray_before = _ray_initialized()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise EntrypointError(f"entrypoint module {module_name!r} not found: a module "
                                  "name is looked up from the current directory and installed "
                                  "packages, not the job file's folder (a script there: "
                                  "'path/to/script.py:function')") from None
        raise EntrypointError(f"entrypoint module {module_name!r} failed to import: "
                              f"{type(e).__name__}: {e}") from None
    except SystemExit as e:  # it would end this command silently, with the module's code
        raise EntrypointError(_exit_on_import(f"entrypoint module {module_name!r}", e)) from None
    except Exception as e:  # the user's module raised while importing
        raise EntrypointError(f"entrypoint module {module_name!r} failed to import: "
                              f"{_raised(e)}") from None
    _refuse_ray_started_on_import(f"entrypoint module {module_name!r}", ray_before)
    return module


def _ray_initialized() -> bool:
    """Whether this process is connected to a Ray (asked of Ray only where it is imported:
    this module never imports it)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def _refuse_ray_started_on_import(what: str, ray_before: bool) -> None:
    """EntrypointError when importing the entry point initialized Ray: a top-level
    ray.init(), a Trainer's fit() or a Ray Data read (a plain Ray Train script's body). That
    work ran outside the scheduler, and the launcher then used that Ray (connect() keeps one
    already initialized): `--address` and the job file's runtime_env were passed over (the
    latter refused as if given to launch.fit beside the user's own ray.init())."""
    if ray_before or not _ray_initialized():
        return
    sys.modules["ray"].shutdown()  # (what the script started: this command ends here)
    raise EntrypointError(
        f"{what} initialized Ray as it was imported (a top-level ray.init(), a Trainer's "
        "fit() or a Ray Data read): that ran outside the scheduler, and the launcher would "
        "have used that Ray, not the one --address, RAY_ADDRESS and the job file's "
        "runtime_env ask for; code that runs the script belongs under "
        "`if __name__ == \"__main__\":`, so that importing it only defines the loop")


def _raised(error: BaseException) -> str:
    """`Name: message` of an error raised as the user's module was imported, with where in
    the user's own files (own_frame): the traceback is not shown, and an error raised in a
    helper or a library the script called named no line. A SyntaxError names its own."""
    said = f"{type(error).__name__}: {error}"
    where = None if isinstance(error, SyntaxError) else \
        own_frame(traceback.extract_tb(error.__traceback__))
    return f"{said} ({where})" if where else said


def library_folders() -> tuple[str, ...]:
    """Folders of code that is not the user's: Python's own, installed packages, this
    project's packages (a `launch.report` refusing its arguments is the caller's line), and
    torch.compile's generated code once inductor is loaded."""
    paths = sysconfig.get_paths()
    folders = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    # (and where else packages are installed: `pip install --user`'s site, which sysconfig's
    # paths leave out, and the interpreter's other site-packages)
    folders |= {site.getusersitepackages(), *getattr(site, "getsitepackages", list)()}
    folders |= {str(PROJECT_ROOT / package) for package in PROJECT_PACKAGES}
    # (and the code torch.compile generates, in inductor's cache folder: "ceveuvyn...py line
    # 156, in call" was named, not the user's line that called the compiled model)
    inductor = sys.modules.get("torch._inductor.runtime.cache_dir_utils")
    if inductor is not None:
        folders.add(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or inductor.default_cache_dir())
    return tuple(os.path.join(os.path.realpath(f), "") for f in folders)


def own_frame(frames: traceback.StackSummary,
              library: tuple[str, ...] | None = None) -> str | None:
    """The innermost of `frames` in the user's own files ("train.py line 57, in
    train_loop"), or None; not in `library` (default: library_folders())."""
    library = library_folders() if library is None else library
    # A relative name that is no file here is a compiled library's (Cython's frames carry
    # their source's path in its package, "pyarrow/error.pxi"): it read as the user's own.
    own = [f for f in frames if not f.filename.startswith("<")
           and (os.path.isabs(f.filename) or os.path.isfile(f.filename))
           and not os.path.realpath(f.filename).startswith(library)]
    if not own:
        return None
    return f"{Path(own[-1].filename).name} line {own[-1].lineno}, in {own[-1].name}"


def _exit_on_import(what: str, exit: SystemExit) -> str:
    """Why a module that called sys.exit() (or argparse that did) as it was imported cannot
    be an entry point."""
    return (f"{what} exited (sys.exit({exit.code!r})) as it was imported: code that runs the "
            "script (argument parsing, a main() call) belongs under "
            "`if __name__ == \"__main__\":`, so that importing it only defines the loop")


def _load_file(where: str, base_dir: Path | None) -> ModuleType:
    # (a ~ expanded as run_dir's and working_dir's are)
    script = expand_home(where, "entrypoint script", EntrypointError)
    candidates = ([base_dir / script] if base_dir else []) + [script]
    path = next((p.resolve() for p in candidates if p.is_file()), None)
    if path is None:
        # Each folder once: the job file's folder is often the working directory (or `where`
        # is absolute), and "looked in /tmp/x, /tmp/x" reads as two places.
        folders = dict.fromkeys(str(c.parent.resolve()) for c in candidates)
        raise EntrypointError(f"entrypoint script {where!r} not found (looked in "
                              f"{', '.join(folders)})")
    # A name of its own per file: two jobs' "train.py" must not share a module.
    name = f"orchestrator_entry_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    # Its own folder first on the import path, as `python train.py` would: a script that
    # imports a file beside it works from any working directory (local_modules ships those).
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    ray_before = _ray_initialized()
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:
        del sys.modules[name]
        raise EntrypointError(_exit_on_import(f"entrypoint script {path}", e)) from None
    except Exception as e:
        del sys.modules[name]
        raise EntrypointError(f"entrypoint script {path} failed to import: "
                              f"{_raised(e)}") from None
    try:
        _refuse_ray_started_on_import(f"entrypoint script {path}", ray_before)
    except EntrypointError:
        del sys.modules[name]
        raise
    return module


# This project's own packages, where they are: the workers run this project and import them
# by name, so they never travel by value (a second copy of their classes would not match).
# By location, not name alone: a user's own `jobs/` or `scripts/` beside a loop must travel.
PROJECT_ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("orchestrator", "ray_layer")


def _ours(module: ModuleType) -> bool:
    top = module.__name__.partition(".")[0]
    return top in PROJECT_PACKAGES and \
        Path(module.__file__).resolve().is_relative_to(PROJECT_ROOT / top)


def local_modules(module: ModuleType) -> list[ModuleType]:
    """The modules `module` (a script loaded from a file) could import because its folder is
    on the import path: its own helpers, which a worker on another node may not find on disk,
    so they travel by value with it. Installed packages never count (they are not found by
    name in that folder, even when they sit below it)."""
    file = getattr(module, "__file__", None)
    if not file:
        return []
    folder = str(Path(file).resolve().parent)
    tops: dict[str, bool] = {}  # top-level name -> found in the folder itself
    found = []
    for other in list(sys.modules.values()):
        if other is module or not getattr(other, "__file__", None):
            continue
        if _ours(other):
            continue
        top = other.__name__.partition(".")[0]
        if top not in tops:
            tops[top] = _from_folder(top, folder)
        # A namespace package may span folders (the script's and an installed one): each of
        # its modules by where it lies (an installed one travelling by value would give the
        # workers second copies of its classes).
        if tops[top] == NAMESPACE and Path(other.__file__).resolve().is_relative_to(folder) \
                or tops[top] is True:
            found.append(other)
    return found


NAMESPACE = "namespace"  # _from_folder's answer for a namespace package with a part there


def _from_folder(top: str, folder: str) -> bool | str:
    """Whether the top-level module `top` was found in the script's `folder`: a module or
    package there (not the same one installed elsewhere); NAMESPACE for a folder of modules
    without an __init__.py there (a namespace package: no __file__ of its own, where it was
    missed, and its modules were pickled by name for workers that cannot import them)."""
    if importlib.machinery.PathFinder.find_spec(top, [folder]) is None:
        return False
    loaded_module = sys.modules.get(top)
    loaded = getattr(loaded_module, "__file__", None)
    if loaded is None:
        return NAMESPACE if any(Path(p).resolve().is_relative_to(folder)
                                for p in getattr(loaded_module, "__path__", None) or ()) \
            else False
    return Path(loaded).resolve().is_relative_to(folder) and not _installed(top, folder, loaded)


def _installed(top: str, folder: str, loaded: str) -> bool:
    """Whether a worker importing `top` by name, without `folder` on its path, gets the very
    module loaded here (`loaded`: its file): from another path entry, or through an import
    hook (an editable install's, as this project's own packages). Then it travels by name;
    by value would make a second copy of its classes. A different module of that name does
    not count: a folder `data/` in the working directory (a namespace package to Python) or
    an installed `utils` is what the worker would import instead of the script's own."""
    elsewhere = [p for p in sys.path if p and Path(p).resolve() != Path(folder)]
    specs = [importlib.machinery.PathFinder.find_spec(top, elsewhere)]
    for finder in sys.meta_path:
        if finder is importlib.machinery.PathFinder or not hasattr(finder, "find_spec"):
            continue
        try:
            specs.append(finder.find_spec(top, None))
        except Exception:  # a broken third-party hook: it finds nothing
            continue
    return any(spec is not None and spec.origin and spec.has_location
               and Path(spec.origin).resolve() == Path(loaded).resolve() for spec in specs)
