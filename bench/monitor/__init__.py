"""
Monitor benchmark: TP/SL triggers and timed predictions under load, and the
feed's heartbeat while they run.

Run ``.venv/bin/python -m bench.monitor`` (``--help`` for options). It writes
``bench/results-monitor.json`` and ``bench/results-monitor.md`` and prints the
table. About four minutes on two cores.

Workload: ``examples/updown-2025-12-11`` (6 markets, 12 assets). The database
holds 100,000 active positions spread over the 12 assets, each with a
take-profit and a stop-loss price (200,000 thresholds), and 24 plain positions.
1,000 of the positions are crossed by the recorded best bid, at frames
computed here from the recording (as ``tests/test_monitor_e2e.py`` does); the
others never are.

The loaded runs also hold 1,000 predictions (``--predictions``) in the groups
of ``PREDICTION_MIX``, and the expected outcome of every one is computed here
from the recording (the best ask of each asset after each frame, and after the
last one, checked against ``expected.json``) and the run's timeline, by the
rules the monitor documents. Decision times are only placed where the books
they see are known, each at least ``MARGIN_S`` (2 s) away from the moments
that change them:

* 70 % are inserted before the daemon starts: due 1-6 s later, while no quote
  exists (the sender holds the tape until 2 s after both the subscription and
  the last of those): deferred, then decided on the first ask the tape brings
  (or still deferred at the end on assets the tape never quotes); edge
  predictions decided on the first qualifying ask, or never; and due 540 s or
  more into their 900 s windows: still pending at the stop (checked);
* 30 % are inserted once the daemon has applied the whole tape (frames read,
  router queue empty): due 2-3 s later on the final books (placed, skipped
  ``price_above_limit``, or deferred), windows closing without an ask
  (``no_price``), already closed (``window_closed``), edge deadlines passing
  (``no_edge``), edges given by the final books (decided on loading).

Every trigger and ``predictions`` row is compared with its expectation (kind,
reason, price, status, ``decided_at`` not earlier than possible, exactly one
trigger), every deferred prediction must have exactly one
``prediction_deferred`` log line (others none), and ``/health`` at the end
must count the pending and the deferred ones. Any difference in any run, in
TP/SL or predictions, makes the benchmark exit 1.

Three runs of ``polystream run`` (a child process, ``feed.ping_interval = 1``),
each on a fresh database cloned from a template:

* ``loaded``: rules and predictions, the capture repeated ``--repeat`` times at
  maximum speed;
* ``baseline``: the same 100,024 positions without TP/SL and no predictions,
  the same tape: the difference in daemon CPU is the monitor's;
* ``paced``: rules and predictions, one repetition at ``--speed`` times the
  recorded speed, where the daemon keeps up.

The sender is the bench's own loopback WebSocket server (wsproto, frames
encoded once up front). It writes whole frames in chunks of at most 64 KiB, a
chunk always ends at a frame that first crosses a rule, and the
``time.monotonic()`` after each chunk's ``send_all`` stamps its frames: a
crossing frame's stamp is the moment its own last byte reached the kernel. It
stamps every text ``PING`` from the daemon on arrival and answers ``PONG`` at
once. A thread of the bench ``LISTEN``s on ``polystream_triggers`` (and counts
``polystream_positions``/``polystream_predictions``, which make the daemon
reload its rules) and stamps each notification on receipt; trigger ids are
mapped to positions through the ``triggers`` table afterwards.

Times are ``time.monotonic()``, one clock for all processes. The machine is
shared and noisy: compare figures within one run only.

PostgreSQL: ``POLYSTREAM_BENCH_DSN``, else ``POLYSTREAM_TEST_DSN`` (an admin
DSN), else an embedded server for the run (``bench.harness.admin_database``). Databases
``polystream_benchmon_<pid>_*`` are dropped afterwards.

The modules, in the order a run uses them:

* :mod:`bench.monitor.recording`: the capture encoded once, the books it
  leads to (bids and asks after every frame), the final asks checked;
* :mod:`bench.monitor.rules`: the positions, their TP/SL and the crossing each must fire;
* :mod:`bench.monitor.predictions`: the predictions of :data:`PREDICTION_MIX`, planned;
* :mod:`bench.monitor.expected`: what must become of each prediction on a run's timeline;
* :mod:`bench.monitor.database`: template databases, the predictions' insertion,
  the outcome read back, the NOTIFY listener;
* :mod:`bench.monitor.sender`: the WebSocket sender that plays the tape and answers PINGs;
* :mod:`bench.monitor.run`: one daemon run and what was seen meanwhile;
* :mod:`bench.monitor.checks`: a run's figures and its exact checks;
* :mod:`bench.monitor.report`: the results document, the table, the failures;
* :mod:`bench.monitor.__main__`: the command line and the three runs.
"""
