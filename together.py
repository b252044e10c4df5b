"""Several processes fail together: when one process ends with an error (a full disk under the main process's save,
an exception in one process's data loader, out of memory), every process exits within seconds with that one-line
error (leave_together, a decorator of a stage script's main), instead of hanging in its next collective."""

import contextlib
import functools
import os
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch.distributed as dist

POLL, GRACE = 1.0, 10.0  # seconds: how often each process looks for a failure; how long a failing one waits


def shared_store():
    """A client of the key-value store that torch.distributed's processes meet at (MASTER_ADDR:MASTER_PORT, hosted
    by the launcher), with keys of this launch only (torchrun may restart workers with the same store), or None on
    one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timedelta(seconds=30))
    return dist.PrefixStore(f"fastmoco-failure/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


class FailureWatch(threading.Thread):
    """A daemon thread that ends this process with another process's one-line error as soon as one is posted."""

    def __init__(self):
        super().__init__(daemon=True)
        self.lock, self.done, self.store = threading.Lock(), threading.Event(), None

    def run(self):
        while not self.done.wait(POLL):
            with self.lock:
                if self.done.is_set():
                    return
                try:
                    self.store = self.store or shared_store()  # None until the process group exists
                    if self.store is None or not self.store.check(["error"]):
                        continue
                    msg = self.store.get("error").decode()
                except Exception:  # the store is gone: the launcher of another machine ended (a normal end there)
                    return
                print(msg, file=sys.stderr, flush=True)  # before the poster may exit (see post)
                with contextlib.suppress(Exception):
                    self.store.add("read", 1)
                os._exit(1)  # the main thread may be blocked inside a collective: no exception could reach it

    def post(self, msg: str) -> bool:
        """Print this process's one-line error and publish it (the first one posted wins), then wait, at most GRACE
        seconds, until every process has printed it: torchrun stops the other processes of a machine as soon as one
        exits. Returns False on one process (nobody to tell, nothing printed)."""
        with self.lock:
            self.done.set()
            try:
                store = self.store or shared_store()
            except Exception:
                store = None
            if store is None:
                return False
            print(msg, file=sys.stderr, flush=True)
            try:
                if not store.check(["error"]):
                    store.set("error", msg)
                store.add("read", 1)
                world, t = dist.get_world_size(), time.time()
                while store.add("read", 0) < world and time.time() - t < GRACE:
                    time.sleep(0.05)
            except Exception:  # the store is gone: nobody is left to tell
                pass
            return True


def first_line(e: Exception) -> str:
    """The first line of an exception's message, printable (a corrupt file's bytes can reach it)."""
    line = (str(e).strip().splitlines() or [""])[0]
    return "".join(c if c.isprintable() else " " for c in line).strip().rstrip(":")


def leave_together(main):
    """Decorator of a script's main: when one process fails (a full disk under the main process's save, an exception
    in one process's data loader, out of memory), every process exits within seconds with that one-line error.

    Without it the others would block in their next collective (DDP's gradient all-reduce) until its timeout (NCCL
    10 min, gloo 30 min), or die with a long traceback where gloo notices the dead peer. Why a store and a thread:
    a flag carried by the step's collectives needs the failing process to still join them (its loader has no
    batch) and a host sync per step; a short collective timeout also ends legitimately slow ones (a checkpoint
    write, the kNN monitor). The store costs nothing in the step: one small request per process per second, and
    it covers a failure anywhere in main. A process killed outright (SIGKILL, a lost machine) posts nothing: torchrun
    stops the others on its machine, the collective timeout the rest."""
    @functools.wraps(main)
    def run(*args, **kwargs):
        watch = FailureWatch()
        watch.start()
        try:
            return main(*args, **kwargs)
        except SystemExit as e:  # a one-line error (fail)
            if isinstance(e.code, str) and watch.post(e.code):
                raise SystemExit(1) from None  # printed by post, before any process exited
            raise
        except Exception as e:  # anything else: this process prints its traceback, every process a line naming it
            if not (dist.is_initialized() and dist.get_world_size() > 1):
                raise
            traceback.print_exc()
            watch.post(f"error: process {dist.get_rank()} failed ({type(e).__name__}: {first_line(e)}); its traceback "
                       "is above in its output; rerun the same command: it resumes from the last checkpoint")
            raise SystemExit(1) from None
        finally:
            watch.done.set()
    return run
