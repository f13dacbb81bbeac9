"""Driving an `EngineCore` from the front end: the core loop, and the two places it can run.

`run_core_loop` is the whole life of a core: take commands (add, abort, abort_all, shutdown),
step while there is work, send one `EngineCoreOutputs` per step (and per abort). It ends on
shutdown, or when the core is dead (its last message says why).

- `InprocCoreClient`: the loop on a thread of this process (tests that reach into the core).
- `MPCoreClient`: the loop in a child process (`elas-serve serve`), so the step loop shares no GIL
  with HTTP, JSON and detokenization. Commands go through a sender thread (the event loop never
  blocks on a full pipe); a reader thread receives outputs. If the child dies, the reader sees the
  pipe close and reports the core dead at once, with its exit code.

Both deliver outputs by calling `on_outputs` from their own thread; the caller marshals them.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable
from typing import Any

from .messages import EngineCoreOutput, EngineCoreOutputs, ModelInfo, SchedulerStats

log = logging.getLogger("elas_serve.engine")
Command = tuple[str, Any]  # ("add", EngineCoreRequest) | ("abort", [ids]) | ("abort_all", None) | ("shutdown", None)
OnOutputs = Callable[[EngineCoreOutputs], None]


def run_core_loop(core, recv: Callable[[bool], list[Command]], send: OnOutputs) -> None:
    """Serve commands and step until shutdown or death. `recv(block)` returns the pending commands,
    waiting for at least one when `block`."""
    while True:
        for kind, arg in recv(not core.has_unfinished_requests()):
            if kind == "shutdown":
                return
            if kind == "add":
                try:
                    core.add_request(arg)
                except Exception as e:  # noqa: BLE001 (refused: only this request fails)
                    log.exception("request %s could not be added", arg.request_id)
                    send(EngineCoreOutputs([EngineCoreOutput(arg.request_id, finish_reason="error",
                                                             error=f"the engine refused the request: {e}")],
                                           core.scheduler.make_stats()))
            elif kind == "abort":
                send(core.abort_requests(arg))
            elif kind == "abort_all":
                send(core.abort_all())
        if not core.has_unfinished_requests():
            continue
        try:
            outputs = core.step()
        except Exception:  # noqa: BLE001 (a failure outside the step's own containment)
            log.exception("engine step raised")
            core.num_consecutive_failed_steps += 1
            outputs = EngineCoreOutputs([], SchedulerStats())
        outputs.dead = core.dead_reason
        send(outputs)
        if outputs.dead:
            log.error("the engine is dead: %s", outputs.dead)
            return


class InprocCoreClient:
    """The core loop on a daemon thread of this process."""

    def __init__(self, core, on_outputs: OnOutputs):
        self.core, self.model_info = core, core.model_info
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(on_outputs,), name="elas-engine-core", daemon=True)
        self._thread.start()

    def _recv(self, block: bool) -> list[Command]:
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _run(self, on_outputs: OnOutputs) -> None:
        try:
            run_core_loop(self.core, self._recv, on_outputs)
        except BaseException as e:  # noqa: BLE001 (the thread ends: nobody may wait forever)
            log.exception("the engine core thread failed")
            on_outputs(EngineCoreOutputs([], SchedulerStats(), dead=f"the engine core thread failed: {e!r}"))

    def send(self, kind: str, arg: Any = None) -> None:
        self._commands.put((kind, arg))

    def shutdown(self, timeout: float = 5.0) -> None:
        self.send("shutdown")
        self._thread.join(timeout)


def _core_process_main(config, commands, outputs) -> None:
    """The child process: load the model, report ready (or why not), run the loop."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from elas_serve.models import CheckpointError

    from .core import EngineCore
    try:
        core = EngineCore.from_config(config)
    except (CheckpointError, ValueError) as e:
        outputs.send(("error", type(e).__name__, str(e)))
        return
    outputs.send(("ready", core.model_info))
    gc.collect()
    gc.freeze()  # NOTE: the model and libraries are never garbage: full collections skip them

    def recv(block: bool) -> list[Command]:
        got: list[Command] = []
        while (block and not got) or commands.poll():
            try:
                got += commands.recv()  # a batch of commands
            except EOFError:  # the front end is gone
                return [("shutdown", None)]
        return got

    run_core_loop(core, recv, outputs.send)
    gc.unfreeze()


class MPCoreClient:
    """The core loop in a child process (spawned: safe with CUDA)."""

    def __init__(self, config, on_outputs: OnOutputs):
        ctx = multiprocessing.get_context("spawn")
        cmd_reader, self._cmd_writer = ctx.Pipe(duplex=False)
        self._out_reader, out_writer = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_core_process_main, args=(config, cmd_reader, out_writer),
                                   name="elas-engine-core", daemon=True)
        self._closing = False
        self.process.start()
        cmd_reader.close()
        out_writer.close()
        self.model_info = self._wait_ready()
        self._commands: queue.SimpleQueue[Command | None] = queue.SimpleQueue()
        threading.Thread(target=self._send_loop, name="elas-core-sender", daemon=True).start()
        threading.Thread(target=self._recv_loop, args=(on_outputs,), name="elas-core-reader", daemon=True).start()

    def _wait_ready(self) -> ModelInfo:
        try:
            message = self._out_reader.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(f"the engine core process exited (code {self.process.exitcode}) before it was "
                               f"ready") from None
        if message[0] == "error":
            self.process.join(5)
            from elas_serve.models import CheckpointError
            raise (CheckpointError if message[1] == "CheckpointError" else ValueError)(message[2])
        return message[1]

    def _send_loop(self) -> None:
        while (first := self._commands.get()) is not None:
            batch = [first]
            while True:
                try:
                    item = self._commands.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._commands.put(None)
                    break
                batch.append(item)
            try:
                self._cmd_writer.send(batch)
            except OSError:  # the core is gone; the reader reports it
                return

    def _recv_loop(self, on_outputs: OnOutputs) -> None:
        while True:
            try:
                outputs = self._out_reader.recv()
            except (EOFError, OSError):
                if self._closing:  # asked to stop: the pipe closing is the expected end
                    return
                self.process.join(5)
                on_outputs(EngineCoreOutputs([], SchedulerStats(), dead=(
                    f"the engine core process exited unexpectedly (exit code {self.process.exitcode})")))
                return
            on_outputs(outputs)
            if outputs.dead:
                return

    def send(self, kind: str, arg: Any = None) -> None:
        self._commands.put((kind, arg))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._closing = True
        self.send("shutdown")
        self._commands.put(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
