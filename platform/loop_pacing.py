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

Fifty wakes a second still cost: under Ray Train, MVPTR's Flickr8k preset in fp32 on 2 cores
(a 2.5-3 s step), the ``SplitCoordinator`` took 12-17% of a core all run, which the trainer's two
threads went without. So the floor is :data:`HELD_LOOP_FLOOR_S` while the consumer has output
it has not taken (the executor's output queue is not empty, Ray Data's own test for a consumer
that is not blocked on it): it reads that first, and a block it asks for after it waits at most
0.1 s more for the loop. Once it has taken them all the floor is :data:`LOOP_FLOOR_S` again. The
same runs' coordinator took 3-6% of a core with it (``alignlab train mvptr_flickr8k_cpu``, 20 s
windows of ``/proc``), and the reference row's data wait in ``alignlab bench --ray --sections
data_wait_flickr8k`` (a 46 ms step, the fastest consumer) was 1.2% against 1.5% without.

This is the one place AlignLab reaches into Ray Data's executor: through the execution-callback
hook that ``DataContext.custom_execution_callback_classes`` and ``RAY_DATA_EXECUTION_CALLBACKS``
expose, not by patching it."""

from __future__ import annotations

import time

from ray.data._internal.execution.execution_callback import ExecutionCallback

LOOP_FLOOR_S = 0.02
HELD_LOOP_FLOOR_S = 0.1


class SchedulingLoopFloor(ExecutionCallback):
    """Each scheduling step of one execution takes at least :data:`LOOP_FLOOR_S`, or
    :data:`HELD_LOOP_FLOOR_S` while the consumer has output waiting for it."""

    def __init__(self, floor_s: float = LOOP_FLOOR_S, held_floor_s: float = HELD_LOOP_FLOOR_S,
                 clock=time.monotonic, sleep=time.sleep):
        self.floor_s, self.held_floor_s, self.clock, self.sleep = floor_s, held_floor_s, clock, sleep
        self.last: float | None = None

    def before_execution_starts(self, executor) -> None:
        self.last = self.clock()

    def on_execution_step(self, executor) -> None:
        floor = self.floor_s if executor._consumer_idling() else self.held_floor_s
        now = self.clock()
        if self.last is not None and now - self.last < floor:
            self.sleep(floor - (now - self.last))
            now = self.clock()
        self.last = now


def pace(context) -> None:
    """Registers :class:`SchedulingLoopFloor` on a dataset's ``DataContext`` (once). The list is
    replaced, not appended to: a dataset's context is a copy whose lists may be the global
    context's."""
    if SchedulingLoopFloor not in context.custom_execution_callback_classes:
        context.custom_execution_callback_classes = [*context.custom_execution_callback_classes, SchedulingLoopFloor]
