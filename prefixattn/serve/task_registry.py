"""Tasks on demand: a request's ``model`` resolved to ``DIR/NAME`` on first use, at most
``max_loaded`` of them in the bank (least recently used evicted), as vLLM's LoRA resolver
with ``max_cpu_loras`` or SGLang's ``--max-loaded-loras``.

The life of a task from the folder::

    request for NAME ──> acquire(NAME): a lease (NAME is not evicted while leased)
       loaded?  yes ──> served (moved to the LRU's end)
                no ───> one load job per NAME (concurrent requests share it), on the
                        loader thread, never the engine's step loop nor the event loop:
                          read DIR/NAME (task store: files only, no lock)
                          make room: evict the least recently used task that no
                            request uses (engine.tasks_in_use() and leases); none:
                            wait for one (busy_timeout, then 429)
                          bank.add under engine.model_lock (one bank rebuild; a soft
                            prompt also one forward of its P virtual tokens)
    request done (rows submitted / finished) ──> release(NAME)

Tasks in the bank that the registry did not load (the base model, ``--task`` tasks given
at start-up, tasks added by the admin route) are pinned: never evicted, not counted in
``max_loaded``. Names are one path component of a safe charset; the resolved directory
must lie inside the folder (a symlink out of it is refused).
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ..hf.bank import TaskBank
from ..hf.task_store import PEFT_CONFIG_NAME, PREFIX_CONFIG_NAME, PROMPT_CONFIG_NAME, read_task

__all__ = [
    "TASK_DIR_NAME",
    "TaskNameError",
    "TaskNotFoundError",
    "TaskRegistry",
    "TasksBusyError",
]

# one path component: no '/', no leading '.' (so never '.' or '..'), at most 128 characters
TASK_DIR_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}$")
_CONFIGS = (PREFIX_CONFIG_NAME, PROMPT_CONFIG_NAME, PEFT_CONFIG_NAME)


class TaskNameError(ValueError):
    """A name that cannot be a task of the folder (the server answers 400)."""


class TaskNotFoundError(LookupError):
    """No such task in the folder, or its artifact cannot be loaded (404)."""


class TasksBusyError(RuntimeError):
    """Every loaded task is in use: none can be evicted for a new one (429)."""


def _percentiles(values: Iterable[float]) -> dict[str, Any]:
    v = sorted(values)

    def pct(p: float) -> float | None:
        return None if not v else v[min(len(v) - 1, round(p / 100 * (len(v) - 1)))]

    return {"count": len(v), "p50": pct(50), "p99": pct(99), "max": v[-1] if v else None}


class TaskRegistry:
    """Resolves task names to ``task_dir/NAME`` and keeps at most ``max_loaded`` loaded.

    Arguments:
        bank: the server's bank (tasks already in it are pinned).
        engine: the serving engine: ``model_lock`` (held for each bank change) and
            ``tasks_in_use()`` (tasks of its unfinished requests, never evicted).
        task_dir: the folder; each task is a sub-directory in any format the task store
            reads (prefixattn or PEFT, prefix or soft prompt).
        max_loaded: tasks from the folder kept in the bank at once (>= 1).
        busy_timeout: how long a load waits for a loaded task to be free (every loaded
            task has requests in flight) before its requests get 429.
    """

    def __init__(
        self,
        bank: TaskBank,
        engine: Any,
        task_dir: str | Path,
        max_loaded: int = 64,
        *,
        busy_timeout: float = 30.0,
    ) -> None:
        if not isinstance(max_loaded, int) or isinstance(max_loaded, bool) or max_loaded < 1:
            raise ValueError(f"max_loaded_tasks must be an int >= 1, got {max_loaded!r}")
        root = Path(task_dir)
        if not root.is_dir():
            raise ValueError(f"task_dir must be a directory, got {str(task_dir)!r}")
        self.root = root.resolve()
        self.bank, self.engine, self.max_loaded = bank, engine, max_loaded
        self._lock = threading.Lock()
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded from the folder, LRU first
        self._loading: dict[str, Future] = {}
        self._evicting: set[str] = set()
        self._leases: Counter[str] = Counter()
        # one loader: bank changes are serialised, loads never run on the step loop
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="prefixattn-taskload")
        self.busy_timeout = float(busy_timeout)
        self._freed = threading.Event()  # a lease ended: a task may be evictable now
        self.loads = self.evictions = self.load_failures = self.room_waits = 0
        self.load_s: deque[float] = deque(maxlen=4096)  # read + make room + insert
        self.insert_s: deque[float] = deque(maxlen=4096)  # held model_lock: bank.add
        self.evict_s: deque[float] = deque(maxlen=4096)  # held model_lock: bank.remove

    # ------------------------------------------------------------------ names

    def path_of(self, name: str) -> Path:
        """``task_dir/name`` after checking ``name``.

        Raises:
            TaskNameError: not one path component of letters, digits, ``._:-`` (not
                starting with '.'), 1 to 128 characters, or a path that resolves outside
                the folder (a symlink out of it).
        """
        if not isinstance(name, str) or not TASK_DIR_NAME.match(name):
            raise TaskNameError(
                f"model {name!r} is not a task name: use 1 to 128 letters, digits, '.', '_', "
                "':' or '-', not starting with '.'"
            )
        path = self.root / name
        resolved = path.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise TaskNameError(f"model {name!r}: the task's path leads outside the task folder")
        return path

    def in_folder(self, name: str) -> bool:
        """The folder has a task ``name`` (a directory with a task's config file).

        Raises:
            TaskNameError: a bad name (see :meth:`path_of`).
        """
        path = self.path_of(name)
        return path.is_dir() and any((path / c).is_file() for c in _CONFIGS)

    def available(self) -> list[str]:
        """Names of the folder's tasks (sub-directories holding a task's config file)."""
        names = []
        for p in sorted(self.root.iterdir()):
            try:
                if self.in_folder(p.name):
                    names.append(p.name)
            except TaskNameError:
                continue
        return names

    @property
    def loaded(self) -> list[str]:
        """Tasks loaded from the folder, least recently used first."""
        with self._lock:
            return list(self._lru)

    def is_pinned(self, name: str) -> bool:
        """In the bank and not loaded by the registry (start-up or admin task, the base)."""
        with self._lock:
            return self._is_pinned(name)

    def _is_pinned(self, name: str) -> bool:
        return name in self.bank and name not in self._lru and name not in self._evicting

    # ------------------------------------------------------------------ requests

    def acquire(self, name: str) -> Future | None:
        """Lease ``name`` (call :meth:`release` once the request's rows are submitted or
        done). Returns None when it is served now, else the future of its load (shared by
        concurrent requests; it raises TaskNotFoundError or TasksBusyError).

        Raises:
            TaskNameError: a bad name (nothing leased).
        """
        with self._lock:
            if self._is_pinned(name) or (name in self._lru and name in self.bank):
                if name in self._lru:
                    self._lru.move_to_end(name)
                self._leases[name] += 1
                return None
        path = self.path_of(name)
        with self._lock:
            if name in self._lru and name in self.bank:  # loaded since the check above
                self._lru.move_to_end(name)
                self._leases[name] += 1
                return None
            if name in self._lru and name not in self.bank:  # removed by the admin route
                del self._lru[name]
            self._leases[name] += 1
            fut = self._loading.get(name)
            if fut is None:
                fut = self._pool.submit(self._load, name, path)
                self._loading[name] = fut
            return fut

    def release(self, name: str) -> None:
        """End one lease of ``name``."""
        with self._lock:
            self._leases[name] -= 1
            if self._leases[name] <= 0:
                del self._leases[name]
                self._freed.set()

    # ------------------------------------------------------------------ the loader thread

    def _load(self, name: str, path: Path) -> None:
        t0 = time.perf_counter()
        ok = False
        try:
            if not path.is_dir():
                raise TaskNotFoundError(
                    f"model {name!r} is not served: no task of that name in the task folder"
                )
            try:
                art = read_task(path)
            except Exception as err:  # a corrupt artifact may fail in any library underneath
                raise TaskNotFoundError(
                    f"model {name!r}: cannot read the task: {type(err).__name__}: {err}"
                ) from None
            self._make_room()
            try:
                with self.engine.model_lock:
                    t1 = time.perf_counter()
                    self.bank.add(name, art)
                    self.insert_s.append(time.perf_counter() - t1)
            except Exception as err:  # it does not fit the model
                raise TaskNotFoundError(
                    f"model {name!r}: cannot load the task: {type(err).__name__}: {err}"
                ) from None
            ok = True
        finally:
            with self._lock:
                if ok:
                    self._lru[name] = None
                    self.loads += 1
                    self.load_s.append(time.perf_counter() - t0)
                else:
                    self.load_failures += 1
                self._loading.pop(name, None)

    def _make_room(self) -> None:
        """Evict least recently used tasks until one more fits (loader thread only); while
        every loaded task is in use, wait (up to ``busy_timeout`` seconds, then 429) for
        one to be free."""
        waited_since = None
        while True:
            with self._lock:
                if len(self._lru) < self.max_loaded:
                    return
                busy = self.engine.tasks_in_use() | set(self._leases)
                victim = next((n for n in self._lru if n not in busy), None)
                if victim is None:
                    if waited_since is None:
                        waited_since = time.monotonic()
                        self.room_waits += 1
                    elif time.monotonic() - waited_since > self.busy_timeout:
                        raise TasksBusyError(
                            f"all {len(self._lru)} loaded tasks (--max-loaded-tasks "
                            f"{self.max_loaded}) have had requests in flight for "
                            f"{self.busy_timeout:g} s; retry later"
                        )
                    self._freed.clear()
            if victim is None:  # wait for a request to end (or poll the engine's rows)
                self._freed.wait(0.02)
                continue
            with self._lock:
                del self._lru[victim]
                self._evicting.add(victim)
            try:
                with self.engine.model_lock:
                    t0 = time.perf_counter()
                    if victim in self.bank:  # the admin route may have removed it
                        self.bank.remove(victim)
                    self.evict_s.append(time.perf_counter() - t0)
            finally:
                with self._lock:
                    self._evicting.discard(victim)
                    self.evictions += 1

    # ------------------------------------------------------------------ metrics

    def stats(self) -> dict[str, Any]:
        """Loaded count, loads, evictions, load failures, loads that waited for a loaded
        task to be free (``room_waits``), and the seconds a load took
        (``load_s``) and held the engine's model lock (``insert_s``, ``evict_s``)."""
        with self._lock:
            return {
                "task_dir": str(self.root),
                "max_loaded_tasks": self.max_loaded,
                "loaded": len(self._lru),
                "loading": len(self._loading),
                "loads": self.loads,
                "evictions": self.evictions,
                "load_failures": self.load_failures,
                "room_waits": self.room_waits,
                "load_s": _percentiles(self.load_s),
                "insert_s": _percentiles(self.insert_s),
                "evict_s": _percentiles(self.evict_s),
            }

    def close(self) -> None:
        """Stop the loader thread (loads not started are dropped)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
