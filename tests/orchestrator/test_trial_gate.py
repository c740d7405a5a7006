"""The fan-out's turns (orchestrator/trial_gate.py), as its Ray actor runs them: on one event loop."""

import asyncio

from orchestrator.trial_gate import TrialGate


def test_a_trial_waits_for_a_turn_and_keeps_it_across_its_ranks_and_restarts():
    async def scenario():
        gate = TrialGate(turns=1)
        await gate.enter("a")
        await gate.enter("a")  # its other rank, or its workers restarted after a failure
        second = asyncio.create_task(gate.enter("b"))
        await asyncio.sleep(0.05)
        assert not second.done() and await gate.state() == {"free": 0, "holders": ["a"]}
        await gate.leave("nobody")  # a trial that holds no turn gives none back
        await asyncio.sleep(0.05)
        assert not second.done()
        await gate.leave("a")
        await asyncio.wait_for(second, 1)
        assert await gate.state() == {"free": 0, "holders": ["b"]}
        await gate.leave("b")
        await gate.leave("b")  # rank 0, then the trial's driver: once only
        assert await gate.state() == {"free": 1, "holders": []}

    asyncio.run(scenario())


def test_two_turns_let_two_trials_in_and_the_third_waits():
    async def scenario():
        gate = TrialGate(turns=2)
        await gate.enter("a")
        await gate.enter("b")
        third = asyncio.create_task(gate.enter("c"))
        await asyncio.sleep(0.05)
        assert not third.done()
        await gate.leave("b")
        await asyncio.wait_for(third, 1)
        assert await gate.state() == {"free": 0, "holders": ["a", "c"]}

    asyncio.run(scenario())


def test_trials_at_once_keep_room_on_cpus_for_the_one_getting_ready():
    from types import SimpleNamespace

    from orchestrator.finetuning import FanoutSettings, concurrency

    def at_once(resources, **settings):
        values = dict(run="r", model="ViT-B/16", weights="s3://b/r/weights/model.safetensors", weights_sha256="0" * 64,
                      data_root="s3://b/d", results="s3://b/r/finetune")
        return concurrency(SimpleNamespace(available_resources=lambda: resources), FanoutSettings(**values, **settings))

    # The dry run's local Ray (4 logical CPUs), 1-CPU trials: 2 train, a third gets ready.
    assert at_once({"CPU": 4.0}, workers_per_trial=1, cpus_per_worker=1) == 2
    assert at_once({"CPU": 2.0}, workers_per_trial=1, cpus_per_worker=1) == 1  # never none
    # Accelerators: every free one trains; the next trial's workers wait for a running trial's.
    assert at_once({"CPU": 64.0, "GPU": 8.0}, workers_per_trial=2, gpus_per_worker=1) == 4
    assert at_once({"CPU": 4.0}, workers_per_trial=1, cpus_per_worker=1, max_concurrent_trials=3) == 3
