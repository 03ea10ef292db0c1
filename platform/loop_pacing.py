"""A floor under the period of Ray Data's scheduling loop, so a stream that waits on its consumer
stops spinning a core.

Ray Data 2.60's ``StreamingExecutor`` blocks only inside ``ray.wait`` on its running tasks (up to
0.1 s). Once a stream is ahead of its consumer, backpressure leaves it no task running and the
loop runs again at once, over and over: on a 2-core machine training SIMLA's Flickr8k preset the
``SplitCoordinator`` that runs the train stream took 81% of a core (``py-spy``: all of it in
the loop's resource bookkeeping), and the trainer, given both cores, stepped slower than on one
(4.2 against 7.0 samples/s). :class:`SchedulingLoopFloor` sleeps out what is left of
:data:`LOOP_FLOOR_S` after each step. A busy stream is untouched: its steps already wait up to
0.1 s on ``ray.wait``; an idle one wakes 50 times a second, and a task it could dispatch waits at
most 20 ms, against the seconds a batch of images takes to prepare and to train on.

This is the one place AlignLab reaches into Ray Data's executor: through the execution-callback
hook that ``DataContext.custom_execution_callback_classes`` and ``RAY_DATA_EXECUTION_CALLBACKS``
expose, not by patching it."""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

LOOP_FLOOR_S = 0.02


class SchedulingLoopFloor(ExecutionCallback):
    """Each scheduling step of one execution takes at least :data:`LOOP_FLOOR_S`."""

    def __init__(self, floor_s: float = LOOP_FLOOR_S, clock=time.monotonic, sleep=time.sleep):
        self.floor_s, self.clock, self.sleep = floor_s, clock, sleep
        self.last: float | None = None

    def before_execution_starts(self, executor) -> None:
        self.last = self.clock()

    def on_execution_step(self, executor) -> None:
        now = self.clock()
        if self.last is not None and now - self.last < self.floor_s:
            self.sleep(self.floor_s - (now - self.last))
            now = self.clock()
        self.last = now


def pace(context) -> None:
    """Registers :class:`SchedulingLoopFloor` on a dataset's ``DataContext`` (once). The list is
    replaced, not appended to: a dataset's context is a copy whose lists may be the global
    context's."""
    if SchedulingLoopFloor not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, SchedulingLoopFloor]
