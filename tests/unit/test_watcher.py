"""The folder watcher against a real file system, with watchdog's inotify and polling modes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from modelium.types import ModelSource
from modelium.watcher import ModelFolderWatcher
from tests.helpers import wait_for

SETTLE = 1.0


class Recorder:
    def __init__(self) -> None:
        self.ready: list[tuple[float, ModelSource]] = []
        self.removed: list[str] = []

    async def on_ready(self, source: ModelSource) -> None:
        self.ready.append((time.monotonic(), source))

    async def on_removed(self, name: str) -> None:
        self.removed.append(name)


@contextlib.asynccontextmanager
async def _watch(root: Path, rec: Recorder, polling: bool = False) -> AsyncIterator[ModelFolderWatcher]:
    watcher = ModelFolderWatcher(
        [root],
        rec.on_ready,
        rec.on_removed,
        settle_seconds=SETTLE,
        polling=polling,
        poll_interval=0.2,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await asyncio.wait_for(watcher.wait_scanned(), 10)
    try:
        yield watcher
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


watching = pytest.fixture(params=[False, True], ids=["events", "polling"])


@watching
def polling(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


async def test_half_copied_directory_is_not_handed_over_early(
    tmp_path: Path, demo_models: dict[str, Path], polling: bool
) -> None:
    root = tmp_path / "incoming"
    root.mkdir()
    rec = Recorder()
    src = demo_models["text-generation"]
    async with _watch(root, rec, polling):
        target = root / "slow-copy"
        target.mkdir()
        # Copy one file at a time, pausing less than the settle period between files.
        files = sorted(p for p in src.iterdir() if p.is_file())
        for path in files:
            shutil.copy2(path, target / path.name)
            last_write = time.monotonic()
            await asyncio.sleep(SETTLE * 0.5)
            assert rec.ready == [], "handed over while files were still arriving"
        await wait_for(lambda: rec.ready, timeout=15, what="handover after settling")
        at, source = rec.ready[0]
        assert at - last_write >= SETTLE
        assert source.name == "slow-copy" and Path(source.path) == target
        # Quiet afterwards: no second handover for the same files.
        await asyncio.sleep(SETTLE * 2)
        assert len(rec.ready) == 1


async def test_partial_download_files_hold_the_handover(tmp_path: Path, demo_models: dict[str, Path]) -> None:
    root = tmp_path / "incoming"
    root.mkdir()
    rec = Recorder()
    async with _watch(root, rec):
        target = root / "downloading"
        shutil.copytree(demo_models["text-generation"], target)
        weights = target / "model.safetensors"
        weights.rename(target / "model.safetensors.incomplete")
        await asyncio.sleep(SETTLE * 3)
        assert rec.ready == []
        (target / "model.safetensors.incomplete").rename(weights)
        await wait_for(lambda: rec.ready, timeout=15, what="handover after the rename")


async def test_existing_models_picked_up_changes_and_removal(
    tmp_path: Path, demo_models: dict[str, Path], polling: bool
) -> None:
    root = tmp_path / "incoming"
    shutil.copytree(demo_models["text-generation"], root / "Already There")
    (root / ".hidden-staging").mkdir()
    (root / "stray-file.bin").write_bytes(b"x")
    rec = Recorder()
    async with _watch(root, rec, polling):
        await wait_for(lambda: rec.ready, timeout=15, what="startup pickup")
        first = rec.ready[0][1]
        # Names are sanitized; a hash keeps different folders apart.
        assert first.name.startswith("already-there-") and first.name != "already-there"
        assert len(rec.ready) == 1
        # A changed file: handed over again with a new fingerprint.
        (root / "Already There" / "README.md").write_text("now with a model card")
        await wait_for(lambda: len(rec.ready) == 2, timeout=15, what="change handover")
        assert rec.ready[1][1].fingerprint != first.fingerprint
        shutil.rmtree(root / "Already There")
        await wait_for(lambda: rec.removed, timeout=15, what="removal")
        assert rec.removed == [first.name]


@pytest.mark.parametrize("second_first", [False, True], ids=["first-dir-first", "second-dir-first"])
async def test_same_name_in_two_directories_goes_to_the_first_directory_every_time(
    tmp_path: Path, second_first: bool, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for root in (second, first) if second_first else (first, second):
        (root / "foo").mkdir(parents=True)
        (root / "foo" / "config.json").write_text("{}")
    rec = Recorder()
    watcher = ModelFolderWatcher([first, second], rec.on_ready, rec.on_removed, settle_seconds=0.2)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        await wait_for(lambda: rec.ready, timeout=10, what="foo handed over")
        assert watcher.present_models() == {"foo": (first / "foo").resolve()}
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert [s.path for _, s in rec.ready] == [str((first / "foo").resolve())]
    assert f"{(second / 'foo').resolve()} is not served" in caplog.text


@contextlib.contextmanager
def _inotify_instances_used_up() -> Iterator[int]:
    """Take every inotify instance this user may have (fs.inotify.max_user_instances), for real,
    as thousands of watched folders or other programs would; give them back afterwards."""
    libc = ctypes.CDLL(None, use_errno=True)
    fds = []
    try:
        while len(fds) < 100_000:
            fd = libc.inotify_init1(os.O_CLOEXEC)
            if fd < 0:
                assert ctypes.get_errno() in (errno.EMFILE, errno.ENFILE), os.strerror(ctypes.get_errno())
                break
            fds.append(fd)
        yield len(fds)
    finally:
        for fd in fds:
            os.close(fd)


async def test_watcher_falls_back_to_polling_when_inotify_limits_are_reached(
    tmp_path: Path, demo_models: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "incoming"
    root.mkdir()
    rec = Recorder()
    with _inotify_instances_used_up():
        async with _watch(root, rec, polling=False) as watcher:
            assert watcher.polling
            shutil.copytree(demo_models["text-generation"], root / "late")
            await wait_for(lambda: rec.ready, timeout=15, what="a folder seen by polling")
    assert rec.ready[0][1].name == "late"
    assert "fs.inotify.max_user_instances" in caplog.text and "Polling every" in caplog.text


async def test_folders_whose_events_were_lost_are_found_by_the_rescan(
    tmp_path: Path, demo_models: dict[str, Path]
) -> None:
    """The kernel drops events when its inotify queue overflows (thousands of folders at once).
    Here the observer reports nothing at all (polling once an hour): a folder that arrives, and
    one that leaves, are still seen, by listing the watched directory again."""
    root = tmp_path / "incoming"
    root.mkdir()
    rec = Recorder()
    watcher = ModelFolderWatcher(
        [root], rec.on_ready, rec.on_removed, settle_seconds=0.2, polling=True, poll_interval=3600, rescan_seconds=0.5
    )
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    try:
        await asyncio.wait_for(watcher.wait_scanned(), 10)
        shutil.copytree(demo_models["text-generation"], root / "unseen")
        await wait_for(lambda: rec.ready, timeout=15, what="a folder found by the rescan")
        assert rec.ready[0][1].name == "unseen"
        shutil.rmtree(root / "unseen")
        await wait_for(lambda: rec.removed, timeout=15, what="a removal found by the rescan")
        assert rec.removed == ["unseen"]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
